//! Health verdicts shared through the Leases: each node publishes, on its own Lease
//! (`sluice-node-<node>`, the one that carries its load), which of the nodes it watches it finds
//! down ([`DOWN_ANNOTATION`]), and only when that changes (plus the Lease's heartbeat); every
//! agent reads every node's Lease and drains a node when [`super::ring::Ring::quorum`] of its
//! watchers say so ([`tally`]). So the drained set is the same on every node: it comes from
//! shared state, never from one node's own opinion.
//!
//! Another node's Lease is untrusted input (any node's credentials may write any Lease of the
//! namespace): its annotation is read only when it is at most [`MAX_VOTES_BYTES`], parses as a
//! map of node names to check names, names at most [`MAX_CHECKS`] checks per node, and is
//! fresh ([`super::load::STALE_AFTER`], by the reader's clock); a vote about a node its writer
//! does not watch on the ring is ignored. A single writer can therefore never drain a node on
//! its own (the quorum is at least 2 from 3 nodes up), and a dead writer's votes expire.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::{Api, Client};
use log::{info, warn};
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::load::{HEARTBEAT, LEASE_PREFIX, LeaseClock, is_fresh, lease_name, patch_own_lease};
use super::probe::Prober;
use super::ring::Ring;
use super::{Health, Verdict};
use crate::model::HealthCheck;
use crate::node_state;

/// The annotation of a node's Lease that lists what it finds down: a JSON object, node name ->
/// the checks (as `HealthCheck` shows them, `http:10256/healthz`) failing on that node.
pub const DOWN_ANNOTATION: &str = "sluice.io/down";
/// The longest annotation read (9 nodes x a few checks fit many times over).
pub const MAX_VOTES_BYTES: usize = 16 * 1024;
/// The most checks one vote may name for one node.
pub const MAX_CHECKS: usize = 64;
/// How often the votes are looked at even without a Lease event (a dead writer's votes expire
/// by time alone).
const RECOUNT_EVERY: Duration = Duration::from_secs(1);

/// One node's verdicts: node name -> the checks it finds down there.
pub type Votes = BTreeMap<String, BTreeSet<String>>;

pub fn encode(votes: &Votes) -> String {
    serde_json::to_string(votes).unwrap_or_else(|_| "{}".to_owned())
}

/// Reads a [`DOWN_ANNOTATION`] value, refusing anything out of bounds.
pub fn decode(text: &str) -> Result<Votes, String> {
    if text.len() > MAX_VOTES_BYTES {
        return Err(format!(
            "{DOWN_ANNOTATION} is {} bytes, more than {MAX_VOTES_BYTES}",
            text.len()
        ));
    }
    let votes: Votes = serde_json::from_str(text)
        .map_err(|e| format!("{DOWN_ANNOTATION} is not a map of node names to checks: {e}"))?;
    if let Some((node, checks)) = votes.iter().find(|(_, c)| c.len() > MAX_CHECKS) {
        return Err(format!(
            "{DOWN_ANNOTATION} names {} checks of node {node:?}, more than {MAX_CHECKS}",
            checks.len()
        ));
    }
    Ok(votes)
}

/// The Ready nodes' ring (who watches whom).
pub fn ready_ring(nodes: &[Arc<Node>]) -> Ring {
    Ring::new(
        nodes
            .iter()
            .filter(|n| node_state::is_ready(n))
            .filter_map(|n| n.metadata.name.as_deref()),
    )
}

/// What the Leases say about health: the fresh, valid votes by writer, and why others do not
/// count.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ballots {
    pub by_writer: BTreeMap<String, Votes>,
    pub problems: BTreeSet<String>,
}

/// The fresh votes of the ring's nodes, each kept only where its writer watches the node.
pub fn ballots(
    leases: &[Arc<Lease>],
    ring: &Ring,
    clock: &LeaseClock,
    wall: Timestamp,
    now: Instant,
) -> Ballots {
    let changed = clock.observe(leases, now);
    let mut out = Ballots::default();
    for lease in leases {
        let Some(name) = lease.metadata.name.as_deref() else {
            continue;
        };
        let Some(writer) = name.strip_prefix(LEASE_PREFIX) else {
            continue;
        };
        let Some(text) = lease
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(DOWN_ANNOTATION))
        else {
            continue;
        };
        if !ring.contains(writer) || !is_fresh(lease, &changed, wall, now) {
            // A node off the ring (not Ready, or no Node) or a stale Lease: no say.
            continue;
        }
        let mut votes = match decode(text) {
            Ok(v) => v,
            Err(e) => {
                out.problems.insert(format!("Lease {name}: {e}; ignored"));
                continue;
            }
        };
        votes.retain(|node, checks| {
            let counts = ring.watches(writer, node) && !checks.is_empty();
            if !counts {
                out.problems.insert(format!(
                    "Lease {name}: a vote about node {node:?}, which {writer} does not watch; ignored"
                ));
            }
            counts
        });
        if !votes.is_empty() {
            out.by_writer.insert(writer.to_owned(), votes);
        }
    }
    out
}

/// The (node, check) pairs down for everyone, each with the watchers that say so.
pub type Drained = BTreeMap<(String, String), Vec<String>>;

/// The quorum rule: a check of a node is down when at least `ring.quorum()` of its watchers
/// (itself included) say so.
pub fn tally(ring: &Ring, ballots: &Ballots) -> Drained {
    let Some(quorum) = ring.quorum() else {
        return Drained::new();
    };
    let mut said: Drained = BTreeMap::new();
    for (writer, votes) in &ballots.by_writer {
        for (node, checks) in votes {
            for check in checks {
                said.entry((node.clone(), check.clone()))
                    .or_default()
                    .push(writer.clone());
            }
        }
    }
    said.retain(|_, writers| writers.len() >= quorum);
    said
}

/// What this agent shows and applies for `check` of `node`: down when a quorum of its watchers
/// say so (the same on every node); otherwise this node's own verdict when it probes the node
/// (`own`), a failing one shown but not applied.
pub fn shared_verdict(
    node: &str,
    check: &HealthCheck,
    ring: &Ring,
    drained: &Drained,
    own: Option<Verdict>,
) -> Verdict {
    let quorum = ring.quorum().unwrap_or(0);
    if let Some(writers) = drained.get(&(node.to_owned(), check.to_string())) {
        return Verdict {
            health: Health::Down,
            reason: format!(
                "down for {} of its watchers (quorum {quorum}): {}",
                writers.len(),
                writers.join(", ")
            ),
        };
    }
    if !ring.contains(node) {
        return Verdict {
            health: Health::Unknown,
            reason: "not Ready: no watchers (its Node status drains it)".into(),
        };
    }
    match own {
        // Disputed: shown (health unknown, the reason in WHY), never applied on one opinion.
        Some(v) if v.health == Health::Down => Verdict {
            health: Health::Unknown,
            reason: format!(
                "this node's probes fail ({}), but fewer than {quorum} of its watchers say so: not drained",
                v.reason
            ),
        },
        Some(v) => v,
        None => Verdict {
            health: Health::Up,
            reason: format!("probed by its watchers: fewer than {quorum} say down"),
        },
    }
}

/// What [`follow`] last counted, for the overlay.
#[derive(Clone, Debug, Default)]
pub struct SharedDrained(Arc<Mutex<(Ring, Drained)>>);

impl SharedDrained {
    pub fn set(&self, ring: Ring, drained: Drained) {
        if let Ok(mut d) = self.0.lock() {
            *d = (ring, drained);
        }
    }

    /// The ring and the drained set as last counted.
    pub fn get(&self) -> (Ring, Drained) {
        self.0.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

/// Counts the votes on every Lease event (and every [`RECOUNT_EVERY`], for expiry); wakes
/// `changed` when the drained set or the ring differs from the last count, so a heartbeat that
/// changes nothing rebuilds nothing.
pub async fn follow(
    leases: Store<Lease>,
    nodes: Store<Node>,
    clock: Arc<LeaseClock>,
    lease_events: Arc<Notify>,
    shared: SharedDrained,
    changed: Arc<Notify>,
) {
    let mut logged: BTreeSet<String> = BTreeSet::new();
    loop {
        let ring = ready_ring(&nodes.state());
        let b = ballots(
            &leases.state(),
            &ring,
            &clock,
            Timestamp::now(),
            Instant::now(),
        );
        for p in b.problems.difference(&logged) {
            warn!("health: {p}");
        }
        logged = b.problems.clone();
        let drained = tally(&ring, &b);
        let (last_ring, last) = shared.get();
        if drained != last || ring != last_ring {
            for ((node, check), writers) in &drained {
                if !last.contains_key(&(node.clone(), check.clone())) {
                    info!("health: node {node} check {check}: down for {writers:?} (a quorum)");
                }
            }
            for (node, check) in last.keys() {
                if !drained.contains_key(&(node.clone(), check.clone())) {
                    info!("health: node {node} check {check}: no longer down for a quorum");
                }
            }
            shared.set(ring, drained);
            changed.notify_one();
        }
        let _ = tokio::time::timeout(RECOUNT_EVERY, lease_events.notified()).await;
    }
}

/// This node's votes: the probed targets that are down, by node name.
pub fn own_votes(prober: &Prober, node_names: &BTreeMap<IpAddr, String>) -> Votes {
    let mut votes = Votes::new();
    for (addr, check) in prober.down_targets() {
        if let Some(node) = node_names.get(&addr) {
            votes
                .entry(node.clone())
                .or_default()
                .insert(check.to_string());
        }
    }
    votes
}

/// Publishes this node's votes on its Lease when they change (and every [`HEARTBEAT`], so that
/// readers know they still hold): wakes on `probe_changed` (a verdict of the prober changed) and
/// on a new node-name map; wakes `changed` after each so the agent's rows follow.
pub async fn publish(
    client: Client,
    namespace: String,
    node: String,
    prober: Arc<Prober>,
    mut node_names: watch::Receiver<BTreeMap<IpAddr, String>>,
    probe_changed: Arc<Notify>,
    changed: Arc<Notify>,
) {
    let api: Api<Lease> = Api::namespaced(client, &namespace);
    let name = lease_name(&node);
    let mut published: Option<(Votes, Instant)> = None;
    let mut failing = false;
    info!("health: publishing node {node}'s verdicts on Lease {namespace}/{name}");
    loop {
        let votes = own_votes(&prober, &node_names.borrow_and_update());
        let due = published
            .as_ref()
            .is_none_or(|(v, at)| *v != votes || at.elapsed() >= HEARTBEAT);
        if due {
            let annotations = json!({ DOWN_ANNOTATION: encode(&votes) });
            match patch_own_lease(&api, &name, &node, annotations).await {
                Ok(()) => {
                    if failing {
                        info!("health: Lease {name} published again");
                    }
                    failing = false;
                    published = Some((votes, Instant::now()));
                }
                Err(e) => {
                    if !failing {
                        warn!("health: publishing Lease {name} failed (retrying): {e}");
                    }
                    failing = true;
                }
            }
        }
        let wait = match (&published, failing) {
            (_, true) => Duration::from_millis(500),
            (Some((_, at)), false) => HEARTBEAT.saturating_sub(at.elapsed()),
            (None, false) => HEARTBEAT,
        };
        tokio::select! {
            _ = probe_changed.notified() => changed.notify_one(),
            r = node_names.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("node-{i}")).collect()
    }

    fn ring(n: usize) -> Ring {
        let all = names(n);
        Ring::new(all.iter().map(String::as_str))
    }

    /// The Lease of `writer` saying `down`, renewed just now.
    fn lease(writer: &str, down: &str) -> Arc<Lease> {
        Arc::new(
            serde_json::from_value::<Lease>(json!({
                "metadata": {"name": lease_name(writer), "resourceVersion": "1",
                    "annotations": {DOWN_ANNOTATION: down}},
                "spec": {"renewTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(Timestamp::now())},
            }))
            .unwrap(),
        )
    }

    fn count(leases: &[Arc<Lease>], ring: &Ring) -> (Drained, BTreeSet<String>) {
        let b = ballots(
            leases,
            ring,
            &LeaseClock::default(),
            Timestamp::now(),
            Instant::now(),
        );
        (tally(ring, &b), b.problems)
    }

    const CHECK: &str = "http:10256/healthz";

    fn down(node: &str) -> String {
        encode(&Votes::from([(
            node.to_owned(),
            BTreeSet::from([CHECK.to_owned()]),
        )]))
    }

    #[test]
    fn three_nodes_need_two_votes() {
        let r = ring(3);
        let (d, _) = count(&[lease("node-0", &down("node-2"))], &r);
        assert!(d.is_empty(), "one vote of 2 needed: {d:?}");
        let (d, _) = count(
            &[
                lease("node-0", &down("node-2")),
                lease("node-1", &down("node-2")),
            ],
            &r,
        );
        let key = ("node-2".to_owned(), CHECK.to_owned());
        assert_eq!(d[&key], ["node-0", "node-1"]);
        // The same votes about another check do not add up.
        let other = encode(&Votes::from([(
            "node-2".to_owned(),
            BTreeSet::from(["tcp:80".to_owned()]),
        )]));
        let (d, _) = count(
            &[lease("node-0", &down("node-2")), lease("node-1", &other)],
            &r,
        );
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn a_large_cluster_drains_at_the_quorum_of_its_watchers_only() {
        let r = ring(1_000);
        let x = "node-500";
        let watchers: Vec<&str> = r.watchers(x).into_iter().filter(|w| *w != x).collect();
        let outsiders: Vec<String> = names(1_000)
            .into_iter()
            .filter(|n| !r.watchers(x).contains(&n.as_str()))
            .take(20)
            .collect();
        // Twenty nodes that do not watch x say it is down: nothing, and each is reported.
        let forged: Vec<Arc<Lease>> = outsiders.iter().map(|o| lease(o, &down(x))).collect();
        let (d, problems) = count(&forged, &r);
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(problems.len(), 20, "{problems:?}");
        // Quorum - 1 watchers: not down; quorum: down.
        let q = r.quorum().unwrap();
        let votes = |n: usize| -> Vec<Arc<Lease>> {
            watchers[..n].iter().map(|w| lease(w, &down(x))).collect()
        };
        assert!(count(&votes(q - 1), &r).0.is_empty());
        assert_eq!(count(&votes(q), &r).0.len(), 1);
    }

    #[test]
    fn hostile_annotations_do_not_count() {
        let r = ring(3);
        let good = lease("node-0", &down("node-2"));
        // Over the size bound with a single (long) check name.
        let huge = format!("{{\"node-2\": [\"{}\"]}}", "x".repeat(MAX_VOTES_BYTES));
        let many = format!(
            "{{\"node-2\": [{}]}}",
            (0..=MAX_CHECKS)
                .map(|i| format!("\"tcp:{i}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        for bad in [
            "not json".to_owned(),
            "[\"node-2\"]".to_owned(),
            "{\"node-2\": \"http:10256/healthz\"}".to_owned(),
            "{\"node-2\": [1]}".to_owned(),
            huge,
            many,
            "[".repeat(10_000),
        ] {
            let (d, problems) = count(&[good.clone(), lease("node-1", &bad)], &r);
            assert!(d.is_empty(), "{bad:.40}: {d:?}");
            assert_eq!(problems.len(), 1, "{bad:.40}: {problems:?}");
        }
        // A node that is not on the ring (no Node, or not Ready) has no say.
        let (d, _) = count(&[good.clone(), lease("ghost", &down("node-2"))], &r);
        assert!(d.is_empty(), "{d:?}");
    }

    #[test]
    fn stale_votes_expire_by_the_readers_clock() {
        let r = ring(3);
        let clock = LeaseClock::default();
        let leases = [
            lease("node-0", &down("node-2")),
            lease("node-1", &down("node-2")),
        ];
        let t0 = Instant::now();
        let at = |t: Instant| tally(&r, &ballots(&leases, &r, &clock, Timestamp::now(), t));
        assert_eq!(at(t0).len(), 1);
        // Nobody rewrote them for longer than STALE_AFTER: their writers may be dead.
        assert!(at(t0 + super::super::load::STALE_AFTER).is_empty());
    }

    #[test]
    fn one_nodes_own_failure_is_shown_not_applied() {
        let r = ring(3);
        let check = HealthCheck::new(crate::model::CheckProtocol::Http, 10256, "/healthz");
        let own = Verdict {
            health: Health::Down,
            reason: "3 failed checks in a row".into(),
        };
        let v = shared_verdict("node-2", &check, &r, &Drained::new(), Some(own));
        assert_eq!(v.health, Health::Unknown, "{v:?}");
        assert!(
            v.reason.contains("3 failed checks") && v.reason.contains("fewer than 2"),
            "{v:?}"
        );
        let drained = Drained::from([(
            ("node-2".to_owned(), check.to_string()),
            vec!["node-0".to_owned(), "node-1".to_owned()],
        )]);
        let v = shared_verdict("node-2", &check, &r, &drained, None);
        assert_eq!(v.health, Health::Down);
        assert!(v.reason.contains("node-0, node-1"), "{v:?}");
        // Nobody says down, and this node does not probe it: up by its watchers' word.
        let v = shared_verdict("node-1", &check, &r, &drained, None);
        assert_eq!(v.health, Health::Up);
    }

    #[test]
    fn own_votes_round_trip() {
        let votes = Votes::from([
            (
                "a".to_owned(),
                BTreeSet::from([CHECK.to_owned(), "tcp:80".to_owned()]),
            ),
            ("b".to_owned(), BTreeSet::from(["http:80/".to_owned()])),
        ]);
        assert_eq!(decode(&encode(&votes)).unwrap(), votes);
        assert_eq!(decode("{}").unwrap(), Votes::new());
    }
}
