//! The simulation issue 27 asked for before the build, kept as a test of its targets: N nodes
//! (1,000 and 5,000) on the real [`Ring`], each probing its assignment with the real
//! [`Tracker`] (rise, fall, fast re-probes, hold-down) under the default check (interval 1 s,
//! timeout 500 ms, fall 3, rise 2), every packet lost with 1 % probability, nodes dying and
//! joining all along; each node publishes its down-set on its Lease when it changes (and a
//! heartbeat every [`HEARTBEAT`]), every node sees a write [`WATCH_DELAY`] later, and a node is
//! drained everywhere when [`Ring::quorum`] of its watchers' visible votes say so. Deterministic
//! (seeded), discrete events, simulated time.
//!
//! Measured: probes per node per second, the time from a node's death until every node drains
//! it, false drains (a live node drained), and API writes per node per second.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use super::Health;
use super::load::{HEARTBEAT, STALE_AFTER};
use super::probe::{ProbeError, Tracker};
use super::ring::{QUORUM, Ring};
use crate::model::{CheckProtocol, HealthCheck};

/// A Lease write reaches every watching agent this much later (API server + watch + a rebuild).
const WATCH_DELAY: u64 = 200;
/// A dead node leaves the ring when its Node turns NotReady (the node controller's 40 s grace).
const NOT_READY_AFTER: u64 = 40_000;
/// Packets per probe that may be lost (SYN, SYN-ACK, request, answer): loss costs the probe.
const PACKETS_PER_PROBE: i32 = 4;

/// SplitMix64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Params {
    nodes: usize,
    seconds: u64,
    /// Per packet.
    loss: f64,
    /// A node dies (and a new one joins) this often, from 10 s on.
    churn_every_ms: u64,
    /// The quorum used instead of the ring's (to show why it is what it is).
    quorum: Option<usize>,
    seed: u64,
}

#[derive(Debug, Default)]
struct Report {
    probes_per_node_s_mean: f64,
    probes_per_node_s_max: f64,
    writes_per_node_s_mean: f64,
    writes_per_node_s_max: f64,
    /// Milliseconds from each death to drained everywhere.
    drains_ms: Vec<u64>,
    /// Deaths never drained before the node left the ring (NotReady).
    undrained: usize,
    /// (node, ms) each time a live node was drained.
    false_drains: Vec<(String, u64)>,
    /// Watchers that saw a live node down on their own (quorum or not).
    lone_false_downs: usize,
}

struct Watch {
    target: usize,
    tracker: Tracker,
    epoch: u64,
}

struct SimNode {
    name: String,
    alive: bool,
    born: u64,
    died: Option<u64>,
    watching: Vec<Watch>,
    /// The down-set of its last write.
    published: BTreeSet<usize>,
    probes: u64,
    writes: u64,
}

#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Probe {
        from: usize,
        to: usize,
        epoch: u64,
    },
    Answer {
        from: usize,
        to: usize,
        epoch: u64,
        started: u64,
        ok: bool,
    },
    Visible {
        writer: usize,
        down: Vec<usize>,
    },
    Heartbeat {
        node: usize,
    },
    Expire {
        writer: usize,
    },
    NotReady {
        node: usize,
    },
    Churn,
}

struct Sim {
    p: Params,
    rng: Rng,
    check: HealthCheck,
    base: Instant,
    nodes: Vec<SimNode>,
    index: HashMap<String, usize>,
    ring: Ring,
    /// Visible votes: target -> writers saying it is down.
    votes: HashMap<usize, BTreeSet<usize>>,
    drained: BTreeSet<usize>,
    queue: BinaryHeap<Reverse<(u64, u64, Event)>>,
    seq: u64,
    epoch: u64,
    report: Report,
}

impl Sim {
    fn new(p: Params) -> Sim {
        let mut check = HealthCheck::new(CheckProtocol::Http, 10256, "/healthz");
        check.implicit = false;
        let rng = Rng(p.seed);
        let mut sim = Sim {
            p,
            rng,
            check,
            base: Instant::now(),
            nodes: Vec::new(),
            index: HashMap::new(),
            ring: Ring::default(),
            votes: HashMap::new(),
            drained: BTreeSet::new(),
            queue: BinaryHeap::new(),
            seq: 0,
            epoch: 0,
            report: Report::default(),
        };
        for _ in 0..sim.p.nodes {
            sim.add_node(0);
        }
        sim.reassign(0);
        sim.at(10_000, Event::Churn);
        sim
    }

    fn at(&mut self, t: u64, e: Event) {
        self.seq += 1;
        self.queue.push(Reverse((t, self.seq, e)));
    }

    fn add_node(&mut self, now: u64) -> usize {
        let i = self.nodes.len();
        let name = format!("node-{i}");
        self.index.insert(name.clone(), i);
        self.nodes.push(SimNode {
            name,
            alive: true,
            born: now,
            died: None,
            watching: Vec::new(),
            published: BTreeSet::new(),
            probes: 0,
            writes: 0,
        });
        let first = now + self.rng.below(HEARTBEAT.as_millis() as u64);
        self.at(first, Event::Heartbeat { node: i });
        i
    }

    /// The ring of the nodes not (yet) NotReady; every live node's watches follow it (kept
    /// targets keep their tracker, new ones start unknown at a random phase).
    fn reassign(&mut self, now: u64) {
        let on: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.died.is_none_or(|d| now < d + NOT_READY_AFTER))
            .map(|(_, n)| n.name.clone())
            .collect();
        self.ring = Ring::new(on.iter().map(String::as_str));
        for i in 0..self.nodes.len() {
            if !self.nodes[i].alive {
                continue;
            }
            let want: Vec<usize> = self
                .ring
                .watched_by(&self.nodes[i].name)
                .iter()
                .map(|n| self.index[*n])
                .collect();
            self.nodes[i].watching.retain(|w| want.contains(&w.target));
            for t in want {
                if self.nodes[i].watching.iter().any(|w| w.target == t) {
                    continue;
                }
                self.epoch += 1;
                let epoch = self.epoch;
                self.nodes[i].watching.push(Watch {
                    target: t,
                    tracker: Tracker::new(&self.check),
                    epoch,
                });
                let phase = self.rng.below(self.check.interval.as_millis() as u64);
                self.at(
                    now + phase,
                    Event::Probe {
                        from: i,
                        to: t,
                        epoch,
                    },
                );
            }
            self.publish_if_changed(i, now);
        }
    }

    fn down_set(&self, i: usize) -> BTreeSet<usize> {
        self.nodes[i]
            .watching
            .iter()
            .filter(|w| w.tracker.verdict().health == Health::Down)
            .map(|w| w.target)
            .collect()
    }

    fn publish_if_changed(&mut self, i: usize, now: u64) {
        let down = self.down_set(i);
        if down != self.nodes[i].published {
            self.nodes[i].writes += 1;
            self.nodes[i].published = down.clone();
            self.at(
                now + WATCH_DELAY,
                Event::Visible {
                    writer: i,
                    down: down.into_iter().collect(),
                },
            );
        }
    }

    fn quorum(&self) -> usize {
        self.p.quorum.or(self.ring.quorum()).unwrap_or(usize::MAX)
    }

    /// Sets `writer`'s visible votes to `down` and re-judges the targets it touched.
    fn see(&mut self, writer: usize, down: &BTreeSet<usize>, now: u64) {
        let mut touched: Vec<usize> = down.iter().copied().collect();
        for (t, ws) in self.votes.iter_mut() {
            if ws.contains(&writer) && !down.contains(t) {
                ws.remove(&writer);
                touched.push(*t);
            }
        }
        for t in down {
            self.votes.entry(*t).or_default().insert(writer);
        }
        let q = self.quorum();
        for t in touched {
            let n = self.votes.get(&t).map_or(0, BTreeSet::len);
            if n >= q && self.drained.insert(t) {
                let node = &self.nodes[t];
                match node.died {
                    Some(d) if !node.alive => self.report.drains_ms.push(now - d),
                    _ => self.report.false_drains.push((node.name.clone(), now)),
                }
            } else if n < q {
                self.drained.remove(&t);
            }
        }
    }

    fn step(&mut self, now: u64, e: Event) {
        match e {
            Event::Probe { from, to, epoch } => {
                let live = self.nodes[from].alive
                    && self.nodes[from]
                        .watching
                        .iter()
                        .any(|w| w.target == to && w.epoch == epoch);
                if !live {
                    return;
                }
                self.nodes[from].probes += 1;
                let delivered = self.rng.unit() < (1.0 - self.p.loss).powi(PACKETS_PER_PROBE);
                let ok = self.nodes[to].alive && delivered;
                // An answer comes within a millisecond; silence costs the timeout.
                let took = if ok {
                    1
                } else {
                    self.check.timeout.as_millis() as u64
                };
                let answer = Event::Answer {
                    from,
                    to,
                    epoch,
                    started: now,
                    ok,
                };
                self.at(now + took, answer);
            }
            Event::Answer {
                from,
                to,
                epoch,
                started,
                ok,
            } => {
                if !self.nodes[from].alive {
                    return;
                }
                let at = self.base + Duration::from_millis(now);
                let interval = self.check.interval;
                let target_alive = self.nodes[to].alive;
                let Some(w) = self.nodes[from]
                    .watching
                    .iter_mut()
                    .find(|w| w.target == to && w.epoch == epoch)
                else {
                    return;
                };
                let result = if ok {
                    Ok(())
                } else {
                    Err(ProbeError {
                        refused: false,
                        reason: "no answer".into(),
                    })
                };
                let changed = w.tracker.observe(result, at);
                let delay = w.tracker.next_delay(interval).as_millis() as u64;
                if changed.as_ref().is_some_and(|v| v.health == Health::Down) && target_alive {
                    self.report.lone_false_downs += 1;
                }
                self.at((started + delay).max(now), Event::Probe { from, to, epoch });
                if changed.is_some() {
                    self.publish_if_changed(from, now);
                }
            }
            Event::Visible { writer, down } => {
                let down: BTreeSet<usize> = down.into_iter().collect();
                // A dead writer's last word stays until it expires.
                self.see(writer, &down, now);
            }
            Event::Heartbeat { node } => {
                if self.nodes[node].alive {
                    self.nodes[node].writes += 1;
                    self.at(
                        now + HEARTBEAT.as_millis() as u64,
                        Event::Heartbeat { node },
                    );
                }
            }
            Event::Expire { writer } => self.see(writer, &BTreeSet::new(), now),
            Event::NotReady { node } => {
                if self.drained.remove(&node) {
                    // Drained already (counted when it happened).
                } else {
                    self.report.undrained += 1;
                }
                self.votes.remove(&node);
                self.reassign(now);
            }
            Event::Churn => {
                let victims: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| {
                        let n = &self.nodes[i];
                        n.alive && (n.born == 0 || now - n.born > 20_000)
                    })
                    .collect();
                let victim = victims[self.rng.below(victims.len() as u64) as usize];
                self.nodes[victim].alive = false;
                self.nodes[victim].died = Some(now);
                self.at(
                    now + STALE_AFTER.as_millis() as u64,
                    Event::Expire { writer: victim },
                );
                self.at(now + NOT_READY_AFTER, Event::NotReady { node: victim });
                self.add_node(now);
                self.reassign(now);
                self.at(now + self.p.churn_every_ms, Event::Churn);
            }
        }
    }

    fn run(mut self) -> Report {
        let end = self.p.seconds * 1000;
        while let Some(Reverse((t, _, e))) = self.queue.pop() {
            if t > end {
                break;
            }
            self.step(t, e);
        }
        // Rates over the nodes that lived at least a minute of it.
        let mut probes = Vec::new();
        let mut writes = Vec::new();
        for n in &self.nodes {
            let until = n.died.unwrap_or(end);
            let lived = until.saturating_sub(n.born) as f64 / 1000.0;
            if lived >= 60.0 {
                probes.push(n.probes as f64 / lived);
                writes.push(n.writes as f64 / lived);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
        self.report.probes_per_node_s_mean = mean(&probes);
        self.report.probes_per_node_s_max = max(&probes);
        self.report.writes_per_node_s_mean = mean(&writes);
        self.report.writes_per_node_s_max = max(&writes);
        self.report
    }
}

fn simulate(p: Params) -> Report {
    Sim::new(p).run()
}

fn check_targets(nodes: usize, seconds: u64, churn_every_ms: u64) {
    let p = Params {
        nodes,
        seconds,
        loss: 0.01,
        churn_every_ms,
        quorum: None,
        seed: 27 + nodes as u64,
    };
    let r = simulate(p);
    let worst = r.drains_ms.iter().max().copied().unwrap_or(0);
    let mut sorted = r.drains_ms.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    println!(
        "N = {nodes}, {seconds} s, 1 % loss, a death and a join every {churn_every_ms} ms: \
         probes/node/s mean {:.2} max {:.2}; {} deaths drained everywhere after median {median} ms, \
         worst {worst} ms, {} never; {} false drains ({} lone false downs); \
         API writes/node/s mean {:.3} max {:.3}",
        r.probes_per_node_s_mean,
        r.probes_per_node_s_max,
        r.drains_ms.len(),
        r.undrained,
        r.false_drains.len(),
        r.lone_false_downs,
        r.writes_per_node_s_mean,
        r.writes_per_node_s_max,
    );
    assert!(
        r.probes_per_node_s_max <= 10.0,
        "probes per node per second: {r:?}"
    );
    assert!(r.drains_ms.len() >= 10, "too few deaths to judge: {r:?}");
    assert_eq!(r.undrained, 0, "dead nodes never drained: {r:?}");
    assert!(worst <= 3_000, "a dead node drained after {worst} ms");
    assert!(
        r.false_drains.is_empty(),
        "false drains: {:?}",
        r.false_drains
    );
    // The loss does make single watchers wrong: the quorum is what keeps them harmless.
    assert!(r.lone_false_downs > 0, "no loss seen? {r:?}");
    assert!(
        r.writes_per_node_s_max <= 0.5,
        "API writes per node per second: {r:?}"
    );
}

#[test]
fn at_1000_nodes_probes_and_writes_are_bounded_and_only_the_dead_drain() {
    check_targets(1_000, 300, 2_000);
}

#[test]
fn at_5000_nodes_probes_and_writes_are_bounded_and_only_the_dead_drain() {
    check_targets(5_000, 120, 1_000);
}

/// Why the quorum is three, not two: at twice the loss (2 %) two watchers of a live
/// node are wrong at once now and then, three are not (the same run, only the quorum differs).
#[test]
fn at_twice_the_loss_a_quorum_of_three_still_holds_where_two_drains_live_nodes() {
    let run = |quorum: Option<usize>| {
        simulate(Params {
            nodes: 1_000,
            seconds: 150,
            loss: 0.02,
            churn_every_ms: 2_000,
            quorum,
            seed: 30,
        })
    };
    // The ring's own quorum (QUORUM) against a quorum of two.
    let (two, three) = (run(Some(2)), run(None));
    println!(
        "2 % loss, N = 1000: quorum 2: {} false drains; quorum {QUORUM}: {} ({} lone false downs)",
        two.false_drains.len(),
        three.false_drains.len(),
        three.lone_false_downs
    );
    assert!(two.false_drains.len() >= 2, "{two:?}");
    assert!(three.false_drains.is_empty(), "{three:?}");
    assert_eq!(three.undrained, 0, "{three:?}");
}
