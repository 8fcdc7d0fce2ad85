//! ns/packet of the balancer's paths (IPv4 and IPv6, L2 and encapsulation), from the kernel's own BPF_PROG_TEST_RUN timing
//! (the XDP hook's cost on a real NIC, ~13 ns, is not included). 64-byte frames.

use std::net::IpAddr;

use anyhow::{bail, ensure};
use lb_userspace::{
    dataplane::PASS_PROGRAM,
    model::{FlowState, ForwardingMode, Protocol},
};
use sluice_tests::fixtures::{
    CLIENT, CLIENT6, Frame, Harness, TCP_ACK, TCP_SYN, VIP, VIP6, XDP_PASS, XDP_TX, backend_addr,
    backend_mac, desired, desired_at,
};

/// A 64-byte frame (Ethernet minimum without FCS is 60; 64 with it): TCP with 10 bytes of
/// payload makes 14 + 20 + 20 + 10 = 64.
fn frame64(mut f: Frame) -> Vec<u8> {
    f.payload = vec![0; 10];
    let bytes = f.bytes();
    debug_assert_eq!(bytes.len(), 64);
    bytes
}

const THREE: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false)];

/// ns/packet of an established flow of `vip` in `mode`. Encapsulation leaves a frame the next
/// run would not see as the VIP's (the kernel's loop reruns on the output), so every path is
/// timed in single runs against single runs of the L2 IPv4 established frame, and reported as
/// that frame's loop figure plus the difference (as for new flows).
fn established_single(
    vip: IpAddr,
    mode: ForwardingMode,
    runs: u32,
    reference: &mut Harness,
    reference_frame: &[u8],
) -> anyhow::Result<f64> {
    let mut d = desired_at(vip, Protocol::Tcp, THREE);
    d.vips[0].mode = mode;
    if mode == ForwardingMode::Ipip {
        // IPv4 backend nodes for both VIP families (IPIP / IPv6-in-IPv4 are the 20-byte case).
        d = desired_at(IpAddr::V4(VIP), Protocol::Tcp, THREE);
        d.vips[0].key.addr = vip;
        d.vips[0].mode = mode;
    }
    let mut h = Harness::new()?;
    h.apply(&d)?;
    let f = Frame::tcp(2000, TCP_ACK);
    // The smallest IPv6 TCP frame is 14 + 40 + 20 = 74 bytes.
    let frame = if vip.is_ipv4() {
        frame64(f)
    } else {
        f.v6().bytes()
    };
    h.run(&frame)?;
    let (mut total, mut reference_total) = (0u64, 0u64);
    for _ in 0..runs {
        let (action, _, ns) = h.run_repeat(&frame, 1)?;
        ensure!(action == XDP_TX, "{vip} {mode}: verdict {action}");
        total += ns;
        reference_total += reference.run_repeat(reference_frame, 1)?.2;
    }
    Ok((total as f64 - reference_total as f64) / f64::from(runs))
}

pub fn run(repeat: u32) -> anyhow::Result<Vec<TestRunRow>> {
    let mut h = Harness::new()?;
    h.apply(&desired(
        Protocol::Tcp,
        &[(0, 1, false), (1, 1, false), (2, 1, false)],
    ))?;

    // Baseline: a program that only returns XDP_PASS, timed the same way.
    let mut other = Frame::tcp(1, TCP_SYN);
    other.dst = CLIENT.into();
    let other = frame64(other);
    let (_, _, baseline) = h.run_program(PASS_PROGRAM, &other, repeat)?;
    let baseline_single = single_run_overhead(&mut h, &other)?;

    // Not for a VIP: the cost every other packet on the interface pays.
    let pass = measure(&mut h, &other, repeat, XDP_PASS)?;

    // Established: the connection table hits on every run (the rewritten MACs don't matter).
    let est = frame64(Frame::tcp(2000, TCP_ACK));
    h.run(&est)?;
    let established = measure(&mut h, &est, repeat, XDP_TX)?;

    // New flow: each run must miss, so each is a new 5-tuple in a test run of its own. A single
    // run is timed with cold caches and timer overhead, so the same number of single runs of the
    // established frame, interleaved, is the reference: new flow = established (loop) + the
    // difference of the two single-run averages.
    let flows = (repeat / 20).clamp(1000, 50_000);
    let (mut new_total, mut est_total) = (0u64, 0u64);
    for i in 0..flows {
        let mut f = Frame::tcp((i % 60000) as u16 + 1024, TCP_SYN);
        f.src = std::net::Ipv4Addr::from(u32::from(CLIENT) + 1 + i / 60000).into();
        let (action, _, ns) = h.run_repeat(&frame64(f), 1)?;
        ensure!(action == XDP_TX, "new flow {i}: verdict {action}");
        new_total += ns;
        est_total += h.run_repeat(&est, 1)?.2;
    }
    let new_single = new_total as f64 / f64::from(flows);
    let est_single = est_total as f64 / f64::from(flows);
    let new_flow = established + (new_single - est_single);

    // IPv6: the non-VIP pass and the established L2 path stay valid in the kernel's loop.
    let mut h6 = Harness::new()?;
    h6.apply(&desired_at(IpAddr::V6(VIP6), Protocol::Tcp, THREE))?;
    let mut other6 = Frame::tcp(1, TCP_SYN).v6();
    other6.dst = IpAddr::V6(CLIENT6);
    let pass6 = measure(&mut h6, &other6.bytes(), repeat, XDP_PASS)?;
    let est6 = Frame::tcp(2000, TCP_ACK).v6().bytes();
    h6.run(&est6)?;
    let established6 = measure(&mut h6, &est6, repeat, XDP_TX)?;
    let singles = flows.min(20_000);
    let ipip = established
        + established_single(IpAddr::V4(VIP), ForwardingMode::Ipip, singles, &mut h, &est)?;
    let ip6ip4 = established
        + established_single(
            IpAddr::V6(VIP6),
            ForwardingMode::Ipip,
            singles,
            &mut h,
            &est,
        )?;

    let (trace_other, traced) = established_traced(repeat, &est)?;
    let sc = second_chance(repeat, singles, &mut h, &est)?;

    let note = format!(
        "pass and established: {repeat} runs each in the kernel's loop. New flow: {flows} \
         distinct flows in single runs, {new_single:.0} ns each against {est_single:.0} ns for \
         single runs of the established frame; the pass-only program takes {baseline_single:.0} \
         ns in a single run. Encapsulation: {singles} single runs each against single runs of \
         the IPv4 established frame, added to its loop figure. Traced: a `sluice trace` \
         for another client (the filter checked, no event), and one matching every packet \
         (an event each, no rate limit), in batches of {TRACE_BATCH} runs with the ring drained \
         between them. Second chance (`flow_state: second-chance`, nothing recorded): a client's \
         mid-flow packet and SYN at a first hop that is not the pick, in the kernel's loop; \
         new/mid-flow {:.2}x (target <= 1.2x), mid-flow/table mode's established {:.2}x; a mid-flow \
         packet of the first hop's own flow (its pick before and after the change: its record \
         lookup, a miss) in the kernel's loop; a moved flow at its new pick (conntrack asked, a \
         miss: the first packet handed on to the previous pick and recorded, the rest sent on \
         along the record) in {singles} single runs against the established frame's, added to \
         its loop figure",
        sc.new_flow / sc.mid_flow,
        sc.mid_flow / established,
    );
    let row = |path: &str, ns: f64, target: &str| TestRunRow {
        path: path.into(),
        ns,
        target: target.into(),
        note: note.clone(),
    };
    Ok(vec![
        row("baseline: XDP_PASS-only program", baseline as f64, "-"),
        row("non-VIP pass", pass, "<= 15"),
        row("established flow (table hit)", established, "<= 40"),
        row("new flow (miss, Maglev, insert)", new_flow, "<= 80"),
        row("IPv6 non-VIP pass", pass6, "-"),
        row("IPv6 established flow (L2)", established6, "-"),
        row("established, IPIP encapsulation", ipip, "-"),
        row("established, IPv6 VIP in IPv4", ip6ip4, "-"),
        row("established, trace of another client", trace_other, "-"),
        row("established, traced (event each)", traced, "-"),
        row("second chance: mid-flow packet", sc.mid_flow, "<= 48"),
        row(
            "second chance: new flow (SYN)",
            sc.new_flow,
            "<= 1.2x mid-flow",
        ),
        row("second chance: own flow, VIP changed", sc.own_flow, "-"),
        row(
            "second chance: moved flow at its pick",
            established + sc.handed_on_extra,
            "-",
        ),
    ])
}

/// Second chance's paths (ns/packet): `new_flow` and `mid_flow` at a first hop that is not
/// the pick, `own_flow` a mid-flow packet of the first hop's own flow (its pick both before
/// and after the change: the record lookup, a miss, is its cost), `handed_on_extra` the moved
/// flow's cost at its new pick beyond table mode's established frame.
struct SecondChance {
    mid_flow: f64,
    new_flow: f64,
    own_flow: f64,
    handed_on_extra: f64,
}

/// Node 3 joins nodes 0-2 (tables A then B, as the fixtures' scene): the first hop is node 0
/// (a flow node 3 now picks leaves for node 3), the new pick node 3 (its conntrack, this
/// namespace's, does not know the bench's client: a miss, handed on to table A's pick).
fn second_chance(
    repeat: u32,
    singles: u32,
    reference: &mut Harness,
    reference_frame: &[u8],
) -> anyhow::Result<SecondChance> {
    const A: &[(u8, u32, bool)] = THREE;
    const B: &[(u8, u32, bool)] = &[(0, 1, false), (1, 1, false), (2, 1, false), (3, 1, false)];
    let node = |i: u8, tables: &[&[(u8, u32, bool)]]| -> anyhow::Result<Harness> {
        let mut h = Harness::new()?;
        h.iface.mac = lb_userspace::model::MacAddr(backend_mac(i));
        let this = IpAddr::V4(backend_addr(i));
        for backends in tables {
            let mut d = desired(Protocol::Tcp, backends);
            d.peers = (0..=3).map(|n| IpAddr::V4(backend_addr(n))).collect();
            d.settings.flow_state = FlowState::SecondChance;
            h.apply_as_node(&d, this)?;
        }
        Ok(h)
    };
    // A client port whose flow table B gives node 3 (table A another node).
    let mut first = node(0, &[A, B])?;
    let moved = (1024..u16::MAX)
        .map(|sport| frame64(Frame::tcp(sport, TCP_ACK)))
        .find(|f| {
            first
                .run(f)
                .is_ok_and(|(action, out)| action == XDP_TX && Harness::backend_of(&out) == Some(3))
        })
        .ok_or_else(|| anyhow::anyhow!("no client port moves to node 3"))?;
    // First hop: every packet is picked by the table (no flow entry to find); a flow of
    // another node (this node would pass its own to its stack).
    let sport = (2000..u16::MAX)
        .find(|sport| {
            first
                .run(&frame64(Frame::tcp(*sport, TCP_ACK)))
                .is_ok_and(|(action, out)| {
                    action == XDP_TX && Harness::backend_of(&out).is_some_and(|b| b != 0)
                })
        })
        .ok_or_else(|| anyhow::anyhow!("no client port goes to another node"))?;
    let other = frame64(Frame::tcp(sport, TCP_ACK));
    let mid_flow = measure(&mut first, &other, repeat, XDP_TX)?;
    let syn = frame64(Frame::tcp(sport, TCP_SYN));
    let new_flow = measure(&mut first, &syn, repeat, XDP_TX)?;
    // The first hop's own flow, its pick by both tables: to its stack.
    let own = (2000..u16::MAX)
        .map(|sport| frame64(Frame::tcp(sport, TCP_ACK)))
        .find(|f| first.run(f).is_ok_and(|(action, _)| action == XDP_PASS))
        .ok_or_else(|| anyhow::anyhow!("no client port stays with node 0"))?;
    let own_flow = measure(&mut first, &own, repeat, XDP_PASS)?;
    ensure!(
        first.flow_entries()?.is_empty(),
        "second chance recorded a flow"
    );
    // The new pick: the moved flow's packet is handed on (its output is another frame, so
    // single runs against the reference's).
    let mut pick = node(3, &[A, B])?;
    let (mut total, mut reference_total) = (0u64, 0u64);
    for _ in 0..singles {
        let (action, out, ns) = pick.run_repeat(&moved, 1)?;
        ensure!(
            action == XDP_TX && Harness::backend_of(&out).is_some_and(|b| b != 3),
            "the moved flow at node 3: verdict {action}, not handed on"
        );
        total += ns;
        reference_total += reference.run_repeat(reference_frame, 1)?.2;
    }
    Ok(SecondChance {
        mid_flow,
        new_flow,
        own_flow,
        handed_on_extra: (total as f64 - reference_total as f64) / f64::from(singles),
    })
}

/// Runs per batch of the traced path: well inside the ring's room for events.
const TRACE_BATCH: u32 = 1000;

/// ns/packet of the established frame while a trace runs: for another client (the filter's
/// cost) and for this one (an event per packet).
fn established_traced(repeat: u32, est: &[u8]) -> anyhow::Result<(f64, f64)> {
    let mut h = Harness::new()?;
    h.apply(&desired(Protocol::Tcp, THREE))?;
    h.run(est)?;
    let (client, _) = lb_common::raw_addr(IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1)));
    let mut session = h.start_trace(lb_common::TraceFilter {
        matches: lb_common::trace_match::CLIENT,
        client,
        client_mask: [u32::MAX, 0, 0, 0],
        client_family: lb_common::FAMILY_V4,
        ..Default::default()
    })?;
    let other = measure(&mut h, est, repeat, XDP_TX)?;
    ensure!(
        session.poll(std::time::Duration::ZERO)?.is_empty(),
        "a trace of another client reported this one"
    );
    // Every packet now (the session is the harness's one: change its filter in place).
    session.set_filter(lb_common::TraceFilter::default())?;
    let batches = (repeat / TRACE_BATCH).max(10);
    let mut total = 0u64;
    for _ in 0..batches {
        let (action, _, ns) = h.run_repeat(est, TRACE_BATCH)?;
        ensure!(action == XDP_TX, "traced: verdict {action}");
        total += ns;
        let events = session.poll(std::time::Duration::ZERO)?.len() as u32;
        ensure!(
            events == TRACE_BATCH,
            "traced: {events} events of {TRACE_BATCH}"
        );
        // Draining is slower than the runs: keep the lease (TRACE_LEASE) from lapsing
        // during a long series.
        session.renew()?;
    }
    Ok((other, total as f64 / f64::from(batches)))
}

/// One path's figure.
#[derive(Debug, Clone)]
pub struct TestRunRow {
    pub path: String,
    pub ns: f64,
    pub target: String,
    pub note: String,
}

pub fn print(rows: &[TestRunRow]) {
    println!(
        "sluice XDP ns/packet (BPF_PROG_TEST_RUN, 64-byte frames, {} CPUs)",
        cpus()
    );
    println!("{:<34} {:>8}  {:>8}", "path", "ns/pkt", "target");
    for r in rows {
        println!("{:<34} {:>8.1}  {:>8}", r.path, r.ns, r.target);
    }
    if let Some(r) = rows.first() {
        println!("({})", r.note);
    }
}

fn measure(h: &mut Harness, frame: &[u8], repeat: u32, want: u32) -> anyhow::Result<f64> {
    let (action, _, ns) = h.run_repeat(frame, repeat)?;
    if action != want {
        bail!("verdict {action}, expected {want}");
    }
    Ok(ns as f64)
}

/// Average kernel-reported time of one single-run test of the pass-only program.
fn single_run_overhead(h: &mut Harness, frame: &[u8]) -> anyhow::Result<f64> {
    let runs = 5000u32;
    let mut total = 0u64;
    for _ in 0..runs {
        total += h.run_program(PASS_PROGRAM, frame, 1)?.2;
    }
    Ok(total as f64 / f64::from(runs))
}

pub fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
