//! Property test of the XDP balancer: at least 1,000,000 random and mutated frames through the
//! real program (BPF_PROG_TEST_RUN), each checked against invariants (tests/src/fuzz.rs):
//! only PASS / DROP / TX; a passed frame untouched; a sent frame either a MAC rewrite of a
//! complete TCP/UDP packet for a VIP, an encapsulation that parses, or an ICMP answer whose
//! checksums verify; a valid packet for a live VIP always sent; an unmutated frame for no VIP
//! (and an ARP frame for an address not announced) passed byte for byte; global counters sum to the
//! number of runs. Reproducible: SLUICE_FUZZ_SEED=<seed> SLUICE_FUZZ_PACKETS=<n>.

use std::time::Instant;

use lb_common::GlobalCounter;
use sluice_tests::{
    fixtures::Harness,
    fuzz::{
        ANNOUNCED, ANNOUNCED_MAC, ANNOUNCED6, Case, Rng, World, check, fuzz_desired,
        fuzz_node_addrs, generate, hex,
    },
    require_root,
};

const DEFAULT_PACKETS: u64 = 1_000_000;
/// The connection table of each worker: small, so the fuzz also runs it full (LRU eviction).
const FLOW_TABLE: u32 = 4096;

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    let parsed = value
        .strip_prefix("0x")
        .map_or_else(|| value.parse(), |hex| u64::from_str_radix(hex, 16));
    Some(parsed.unwrap_or_else(|e| panic!("{name}={value:?}: {e}")))
}

/// Runs `count` cases of worker `worker`'s stream; returns its global counters and how many
/// cases had to pass untouched.
fn worker(seed: u64, worker: u64, count: u64) -> (Vec<u64>, u64) {
    let mut desired = fuzz_desired();
    // Worker 0 runs with a flood guard it exceeds, so that the path which forwards new flows
    // without recording them is fuzzed too (its decisions are the same by design).
    if worker == 0 {
        desired.settings.max_new_flows_per_cpu = 100;
    }
    let mut h = Harness::with_flow_table(FLOW_TABLE).expect("load the XDP object");
    h.apply_as_node_with(&desired, &fuzz_node_addrs())
        .expect("program the maps");
    // The node won VIP's election: its ARP requests are answered (as `--announce` writes it).
    h.maps
        .announce_address(ANNOUNCED.into(), ANNOUNCED_MAC)
        .expect("writing ANNOUNCE");
    // ... and ANNOUNCED6's Neighbor Solicitations.
    h.maps
        .announce_address(ANNOUNCED6.into(), ANNOUNCED_MAC)
        .expect("writing ANNOUNCE");
    // A `sluice trace` of every packet runs through it all, never read: unlimited on even
    // workers (the ring fills: trace_lost_ring), 100 per second on odd ones (trace_lost_rate).
    let _trace = h
        .start_trace(lb_common::TraceFilter {
            max_per_sec: if worker.is_multiple_of(2) { 0 } else { 100 },
            ..Default::default()
        })
        .expect("start a trace");
    let world = World::new(desired, &h.snapshot().expect("read the maps"));
    let mut rng = Rng::new(seed ^ worker.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut untouched = 0;
    for index in 0..count {
        let case: Case = generate(&mut rng);
        untouched += u64::from(case.must_pass_untouched);
        let (verdict, out) = h
            .run(&case.frame)
            .unwrap_or_else(|e| panic!("seed {seed:#x} worker {worker} index {index}: {e}"));
        if let Err(why) = check(&world, &case, verdict, &out) {
            panic!(
                "fuzz invariant broken: {why}\n  seed {seed:#x} worker {worker} index {index} \
                 (rerun: SLUICE_FUZZ_SEED={seed:#x})\n  verdict {verdict}\n  input  {}\n  output {}",
                hex(&case.frame),
                hex(&out)
            );
        }
    }
    // Each run ends in exactly one verdict counter; hit / miss / not recorded are extra, VIP
    // traffic only, and so are the trace's.
    let counters: Vec<u64> = GlobalCounter::ALL
        .iter()
        .map(|&c| h.counter(c).expect("read counter"))
        .collect();
    let verdicts: u64 = GlobalCounter::ALL
        .iter()
        .zip(&counters)
        .filter(|(c, _)| {
            !matches!(
                c,
                GlobalCounter::FlowHit
                    | GlobalCounter::FlowMiss
                    | GlobalCounter::FlowsNotRecorded
                    | GlobalCounter::TraceEvents
                    | GlobalCounter::TraceLostRate
                    | GlobalCounter::TraceLostRing
                    | GlobalCounter::SecondChanceHandedOn
                    | GlobalCounter::SecondChanceRecordFollowed
            )
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        verdicts, count,
        "seed {seed:#x} worker {worker}: verdict counters"
    );
    (counters, untouched)
}

#[test]
fn a_million_random_and_mutated_frames_keep_the_invariants() {
    require_root();
    let seed = env_u64("SLUICE_FUZZ_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let packets = env_u64("SLUICE_FUZZ_PACKETS").unwrap_or(DEFAULT_PACKETS);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get() as u64);
    println!("fuzz: seed {seed:#x} (SLUICE_FUZZ_SEED), {packets} frames, {workers} workers");
    let started = Instant::now();
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let share = packets / workers + u64::from(w < packets % workers);
            std::thread::spawn(move || worker(seed, w, share))
        })
        .collect();
    let mut totals = vec![0u64; GlobalCounter::ALL.len()];
    let mut untouched = 0;
    for handle in handles {
        match handle.join() {
            Ok((counters, n)) => {
                totals.iter_mut().zip(counters).for_each(|(t, n)| *t += n);
                untouched += n;
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "fuzz: {packets} frames in {secs:.1} s ({:.1} us/frame wall)",
        secs * 1e6 / packets.max(1) as f64
    );
    for (counter, n) in GlobalCounter::ALL.iter().zip(&totals) {
        println!("  {:<22} {n}", counter.name());
    }
    println!("  {untouched} well-formed frames for no VIP, each passed byte for byte");
    // Every path the generators aim at was reached (a generator that silently stopped
    // producing, say, valid ipip packets would otherwise go unnoticed).
    if packets >= 100_000 {
        // About 5 % of frames are unmutated frames for no VIP.
        assert!(
            untouched >= packets / 50,
            "only {untouched} frames for no VIP were checked"
        );
        for (counter, n) in GlobalCounter::ALL.iter().zip(&totals) {
            let unreachable_here = matches!(
                counter,
                GlobalCounter::Redirected
                    | GlobalCounter::DropInternal
                    // Second-chance mode (and a conntrack entry): fixtures_second_chance.rs.
                    | GlobalCounter::SecondChanceHit
                    | GlobalCounter::SecondChanceHandedOn
                    | GlobalCounter::SecondChanceRecordFollowed
                    | GlobalCounter::SecondChanceHopLimit
            ) || (*counter == GlobalCounter::TraceLostRate && workers < 2);
            assert!(
                unreachable_here || *n > 0,
                "no frame reached {}",
                counter.name()
            );
        }
    }
}
