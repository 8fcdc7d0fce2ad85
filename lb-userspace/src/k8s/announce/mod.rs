//! sluice's own L2 announcement (`sluice agent --announce`): the agents elect one node per VIP
//! address with a `coordination.k8s.io/v1` Lease in their namespace; the holder writes the
//! address into the `ANNOUNCE` map, so that its XDP program answers ARP (IPv6: Neighbor
//! Solicitations) for it (and only forwards: the node never terminates VIP traffic), and sends
//! gratuitous ARP (IPv6: unsolicited Neighbor Advertisements) on takeover so that clients and
//! switches move to its MAC at once.
//!
//! Who should hold an address is decided by [`rank`] (rendezvous hashing of the address and the
//! node names over the live candidates), the Lease is only the lock (`lease::Elector`'s
//! compare-and-swap, expiry by this agent's own clock):
//! - a node contends while it may attract VIP traffic: its Node is not cordoned, NotReady or
//!   labelled `node.kubernetes.io/exclude-from-external-load-balancers`, a quorum of its health
//!   watchers does not find it down ([`Announceable::blocked`]), and its attached interface is
//!   up (netlink). It says so on its own candidacy Lease (`sluice-announce-<node>`, renewed
//!   every round, released when it stops); the live candidates are the nodes whose candidacy
//!   was renewed within the lease duration and whose Node the others do not bar either
//!   ([`Announceable::barred`]);
//! - the preferred node (rank 0) takes a vacant lease at once, a node of rank r after the lease
//!   has been vacant for r x [`rank_step`], so that the preferred one wins when it is alive;
//! - a holder that is not the preferred node hands the address over (stops answering, releases
//!   the lease, the preferred takes it at once) once the preferred has been live for a renew
//!   round; an address the preferred node did not take (it does not serve it yet) is taken
//!   back after the rank's wait and not handed over again for [`handover_hold`], so nothing
//!   flaps;
//! - a node that stops contending releases what it holds at once, so another node takes over
//!   within a round instead of the lease duration.
//!
//! All Leases are read from one watch (label [`LEASE_LABEL`]=[`LEASE_LABEL_VALUE`]); the agent
//! writes only to renew what it holds (its candidacy and its addresses, once per renew round)
//! and to take over or release: (1 + addresses held) requests per renew round per node, however
//! many nodes there are.
//!
//! While the API server cannot be reached the holder keeps answering: nobody else can win the
//! lease meanwhile, and should two nodes answer for a while both forward identically (the same
//! maps, the same Maglev tables), so a client reaches the same backends through either.

pub mod rank;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use log::{debug, info, warn};
use tokio::sync::{Notify, watch};

use super::lease::{Attempt, Elector, Standing};
use crate::dataplane::{AnnounceMap, PinLayout};
use crate::health::votes::Drained;
use crate::net::{self, Interface};
use crate::node_state;

/// How long a lease lasts without renewal unless `--announce-lease-duration` says otherwise.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How often the holder renews and the others look whether a lease became free, with the
/// default lease duration ([`renew_every`]).
pub const RENEW_EVERY: Duration = Duration::from_secs(3);
/// The lease durations `--announce-lease-duration` accepts: a shorter one fails over faster on
/// a dead node and costs more API writes (one per address per renew round).
pub const LEASE_DURATION_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(3)..=Duration::from_secs(300);

/// The renew period of a lease of `duration`: under a third of it, so that two renewals may
/// fail (a slow API server) before the lease expires.
pub fn renew_every(duration: Duration) -> Duration {
    (duration * 3 / 10).max(Duration::from_millis(900))
}
/// How long a node of rank r waits, r times, before it takes a vacant lease: a tenth of the
/// lease (1 s by default), so that the preferred node, woken by the same watch event, wins.
pub fn rank_step(duration: Duration) -> Duration {
    (duration / 10).max(Duration::from_millis(100))
}
/// A preferred node that does not take an address handed over to it (it does not serve that
/// address yet) makes the holder take it back after its rank's wait; the holder then does not
/// hand that address over again for this long (3 lease durations), so nothing flaps.
pub fn handover_hold(duration: Duration) -> Duration {
    duration * 3
}
/// The label of the announcement Leases (VIPs and candidacies): what the watch selects.
pub const LEASE_LABEL: &str = "app.kubernetes.io/component";
pub const LEASE_LABEL_VALUE: &str = "sluice-announce";
/// The candidacy Lease of a node: `sluice-announce-<node>`.
pub const CANDIDATE_PREFIX: &str = "sluice-announce-";
/// How soon to look again for the ANNOUNCE map before the first attach.
const MAP_RETRY: Duration = Duration::from_millis(200);
/// Gratuitous ARPs (IPv6: unsolicited neighbour advertisements, RFC 4861 allows up to 3) sent
/// on takeover, this far apart (one may be lost).
const GARP_COUNT: u32 = 3;
const GARP_GAP: Duration = Duration::from_millis(500);
/// Where a pod finds its own namespace.
const IN_CLUSTER_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// The namespace of deploy/ when neither the flag nor the in-cluster file says otherwise.
pub const DEFAULT_NAMESPACE: &str = "sluice-system";

/// What the announcer needs.
#[derive(Clone, Debug)]
pub struct AnnounceConfig {
    /// Namespace of the Leases (the agent's own: its Role grants Leases there only).
    pub namespace: String,
    /// The holder identity: this node's name.
    pub node_name: String,
    /// The attached interface: its MAC answers ARP and sends the gratuitous ones.
    pub iface: Interface,
    /// Where the attachment's maps are pinned (ANNOUNCE is opened from there).
    pub pins: PinLayout,
    /// How long a lease lasts without renewal ([`LEASE_DURATION`] by default).
    pub lease_duration: Duration,
}

/// What the announcer should contend for: the addresses this node may announce, why it must
/// announce none of them right now (its Node is cordoned, NotReady or excluded, or a quorum of
/// its watchers finds it down), and which other nodes must not either, with why (the same
/// reasons, read from the same shared state by every agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announceable {
    pub addrs: BTreeSet<IpAddr>,
    pub blocked: Option<String>,
    pub barred: BTreeMap<String, String>,
}

/// The namespace of the Leases: `flag`, else the pod's own namespace, else [`DEFAULT_NAMESPACE`].
pub fn lease_namespace(flag: Option<String>) -> String {
    flag.or_else(|| {
        std::fs::read_to_string(IN_CLUSTER_NAMESPACE)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    })
    .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
}

/// The Lease of a VIP address: `sluice-vip-10-0-0-1`, or for IPv6 the eight groups in full
/// (`sluice-vip-fd00-0001-0000-...`), which is always a valid object name.
pub fn lease_name(addr: IpAddr) -> String {
    match addr {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            format!("sluice-vip-{}-{}-{}-{}", o[0], o[1], o[2], o[3])
        }
        IpAddr::V6(v6) => {
            let groups: Vec<String> = v6.segments().iter().map(|g| format!("{g:04x}")).collect();
            format!("sluice-vip-{}", groups.join("-"))
        }
    }
}

/// The nodes that must not announce, with why: what their Node says
/// ([`node_state::announce_block`]), or a check of theirs down for a quorum of their health
/// watchers (`drained`, the same on every agent: see `health::votes`).
pub fn barred_nodes(nodes: &[Arc<Node>], drained: Option<Drained>) -> BTreeMap<String, String> {
    let mut barred: BTreeMap<String, String> = nodes
        .iter()
        .filter_map(|n| Some((n.metadata.name.clone()?, node_state::announce_block(n)?)))
        .collect();
    for ((node, check), watchers) in drained.unwrap_or_default() {
        barred.entry(node.clone()).or_insert_with(|| {
            format!(
                "node {node} fails its health check {check} for {} of its watchers ({})",
                watchers.len(),
                watchers.join(", ")
            )
        });
    }
    barred
}

/// The candidacy Lease of node `node` ([`CANDIDATE_PREFIX`]).
pub fn candidate_lease_name(node: &str) -> String {
    format!("{CANDIDATE_PREFIX}{node}")
}

/// Why `iface` cannot carry announcements now (down, or without a carrier), `None` when it can.
fn link_block(iface: &Interface) -> Option<String> {
    match iface.is_up() {
        Ok(true) => None,
        Ok(false) => Some(format!(
            "interface {} is down (administratively or without a carrier)",
            iface.name
        )),
        Err(e) => Some(format!("{e:#}")),
    }
}

/// How often a contending node reads its interface's state.
const LINK_POLL: Duration = Duration::from_millis(100);

/// Returns once `iface` cannot carry announcements (down, without a carrier, or unreadable).
async fn link_lost(iface: &Interface) {
    while link_block(iface).is_none() {
        tokio::time::sleep(LINK_POLL).await;
    }
}

/// The per-address election loop and what it holds.
struct Announcer {
    elector: Elector,
    config: AnnounceConfig,
    map: Option<AnnounceMap>,
    /// Addresses whose lease this node holds (and which are in ANNOUNCE).
    held: BTreeSet<IpAddr>,
    /// Lease name -> when this node last wrote it as holder (renewals are due a round later).
    renewed: BTreeMap<String, Instant>,
    /// Addresses this node handed over, and when.
    handed: BTreeMap<IpAddr, Instant>,
    /// Addresses this node had to take back after handing them over (the preferred node did
    /// not take them), and when: not handed over again within [`handover_hold`].
    refused: BTreeMap<IpAddr, Instant>,
    /// The live candidates and since when each has been live, by this agent's clock.
    live: BTreeMap<String, Instant>,
    /// Addresses whose last attempt failed (logged once per streak).
    failing: BTreeSet<IpAddr>,
    /// Why this node does not contend now (logged once per change).
    blocked: Option<String>,
    /// Why other nodes do not contend (logged once per change).
    barred: BTreeMap<String, String>,
}

/// Runs the elections for the addresses in `addrs` until `stop` turns true; then removes this
/// node's ANNOUNCE entries and releases its leases, so that another node takes over at once.
pub async fn run(
    client: Client,
    config: AnnounceConfig,
    mut addrs: watch::Receiver<Announceable>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let lease_events = Arc::new(Notify::new());
    let leases = super::agent::watch(
        api.clone(),
        watcher::Config::default().labels(&format!("{LEASE_LABEL}={LEASE_LABEL_VALUE}")),
        lease_events.clone(),
        None,
    );
    let mut a = Announcer {
        elector: Elector::new(api, config.node_name.clone(), config.lease_duration)
            .with_label(LEASE_LABEL, LEASE_LABEL_VALUE),
        config,
        map: None,
        held: BTreeSet::new(),
        renewed: BTreeMap::new(),
        handed: BTreeMap::new(),
        refused: BTreeMap::new(),
        live: BTreeMap::new(),
        failing: BTreeSet::new(),
        blocked: None,
        barred: BTreeMap::new(),
    };
    let renew = renew_every(a.config.lease_duration);
    // Ticks cost no request unless something is due: often enough that a rank's wait or an
    // expiry is acted on within half a rank step.
    let tick = rank_step(a.config.lease_duration) / 2;
    info!(
        "announcing VIPs: one node per address by Lease in namespace {} (as {}, ARP and neighbour solicitations answered from {} {}; leases of {:?}, renewed every {renew:?}; the Leases watched, rank step {:?})",
        a.config.namespace,
        a.config.node_name,
        a.config.iface.name,
        a.config.iface.mac,
        a.config.lease_duration,
        rank_step(a.config.lease_duration),
    );
    // No election before the watch has listed: an absent Lease would look vacant.
    tokio::select! {
        _ = leases.wait_until_ready() => {}
        _ = stop.changed() => return,
    }
    let iface = a.config.iface.clone();
    loop {
        let wanted = addrs.borrow_and_update().clone();
        a.set_blocked(
            wanted
                .blocked
                .clone()
                .or_else(|| link_block(&a.config.iface)),
        );
        a.set_barred(&wanted.barred);
        // A round's API requests may each wait up to a renewal (and go through the very link
        // that went down): the link is watched beside the round, and its loss ends the round
        // so that the next one stops answering at once. A request cut short leaves at worst a
        // lease this node does not know it holds: it expires.
        let contending = a.blocked.is_none();
        let cache = cached_leases(&leases);
        tokio::select! {
            _ = a.tick(&wanted, &cache) => {}
            _ = link_lost(&iface), if contending => continue,
        }
        // Until the reconcile thread has attached (ANNOUNCE pinned), look again soon.
        let next = if a.map.is_some() { tick } else { MAP_RETRY };
        let contending = a.blocked.is_none();
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            _ = lease_events.notified() => {}
            changed = addrs.changed() => { if changed.is_err() { break; } }
            _ = link_lost(&iface), if contending => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    let cache = cached_leases(&leases);
    a.release_all(&cache).await;
}

/// The watch's Leases by name.
fn cached_leases(leases: &Store<Lease>) -> BTreeMap<String, Arc<Lease>> {
    leases
        .state()
        .into_iter()
        .filter_map(|l| Some((l.metadata.name.clone()?, l)))
        .collect()
}

impl Announcer {
    /// Records why this node does not contend (`None`: it does), logging each change.
    fn set_blocked(&mut self, blocked: Option<String>) {
        if blocked == self.blocked {
            return;
        }
        match &blocked {
            Some(why) => info!(
                "not announcing any VIP: {why}: releasing the {} leases held",
                self.held.len()
            ),
            None => info!("announcing VIPs again: this node may attract VIP traffic"),
        }
        self.blocked = blocked;
    }

    /// Records which other nodes do not contend, logging each change.
    fn set_barred(&mut self, barred: &BTreeMap<String, String>) {
        if *barred == self.barred {
            return;
        }
        for (node, why) in barred {
            if self.barred.get(node) != Some(why) && *node != self.config.node_name {
                info!("VIP election: node {node} does not contend: {why}");
            }
        }
        for node in self.barred.keys() {
            if !barred.contains_key(node) && *node != self.config.node_name {
                info!("VIP election: node {node} may contend again");
            }
        }
        self.barred = barred.clone();
    }

    /// The API requests of one attempt or release, bounded: an API server that does not
    /// answer (this node cut off) must not hold up the loop that stops answering ARP.
    fn api_timeout(&self) -> Duration {
        renew_every(self.config.lease_duration)
    }

    /// One round: the ANNOUNCE map opened (once the reconcile thread has attached), the
    /// candidacy renewed or released, every wanted address's lease renewed, taken, handed over
    /// or left as its rank says, addresses no longer served released.
    async fn tick(&mut self, wanted: &Announceable, cache: &BTreeMap<String, Arc<Lease>>) {
        if !self.open_map() {
            return;
        }
        let contending = self.blocked.is_none();
        if contending {
            self.candidacy(true, cache).await;
        } else {
            self.release_all(cache).await;
        }
        self.update_live(cache, &wanted.barred, contending);
        let contended = if contending {
            wanted.addrs.clone()
        } else {
            BTreeSet::new()
        };
        let plan = rank::Plan::new(&contended, self.live.keys().map(String::as_str));
        for addr in &contended {
            self.elect(*addr, &plan, cache).await;
        }
        let gone: Vec<IpAddr> = self.held.difference(&contended).copied().collect();
        for addr in gone {
            info!("VIP {addr}: no longer served: releasing its lease");
            self.give_up(addr);
            self.release(addr, cache).await;
        }
        let me = candidate_lease_name(&self.config.node_name);
        self.elector.forget_except(|name| {
            name.starts_with(CANDIDATE_PREFIX)
                || name == me
                || contended.iter().any(|a| lease_name(*a) == name)
        });
        self.handed.retain(|a, _| contended.contains(a));
        self.refused.retain(|a, _| contended.contains(a));
        self.renewed
            .retain(|name, _| *name == me || contended.iter().any(|a| lease_name(*a) == *name));
    }

    /// Opens ANNOUNCE once the reconcile thread has attached; `false` until then.
    fn open_map(&mut self) -> bool {
        if self.map.is_some() {
            return true;
        }
        match AnnounceMap::from_pins(&self.config.pins) {
            Ok(mut map) => {
                // Entries pinned by an earlier run are stale: this run holds nothing yet.
                match map.addresses() {
                    Ok(stale) => {
                        for addr in stale {
                            if let Err(e) = map.remove(addr) {
                                warn!("{e:#}");
                            }
                        }
                    }
                    Err(e) => warn!("{e:#}"),
                }
                self.map = Some(map);
                true
            }
            Err(e) => {
                // Not attached yet: no election before this node can answer.
                debug!("announce: ANNOUNCE map not open yet: {e:#}");
                false
            }
        }
    }

    /// Renews this node's candidacy Lease when due (or takes it, first), or releases it when
    /// this node does not contend.
    async fn candidacy(&mut self, contending: bool, cache: &BTreeMap<String, Arc<Lease>>) {
        let name = candidate_lease_name(&self.config.node_name);
        let cached = cache.get(&name).map(|l| &**l);
        if !contending {
            if self.renewed.contains_key(&name)
                || self.elector.standing(&name, cached) == Standing::Mine
            {
                let released = tokio::time::timeout(
                    self.api_timeout(),
                    self.elector.release_with(&name, cached),
                )
                .await;
                match released {
                    Ok(Ok(())) => info!("candidacy lease {name} released"),
                    Ok(Err(e)) => warn!("releasing candidacy lease {name} failed: {e}"),
                    Err(_) => warn!("releasing candidacy lease {name}: no answer"),
                }
            }
            self.renewed.remove(&name);
            return;
        }
        if !self.due(&name) {
            return;
        }
        let what = format!("candidacy of {}", self.config.node_name);
        match tokio::time::timeout(
            self.api_timeout(),
            self.elector.attempt_with(&name, &what, cached),
        )
        .await
        {
            Ok(Ok(Attempt::Held)) => {
                self.renewed.insert(name, Instant::now());
            }
            Ok(Ok(Attempt::NotHeld)) => {
                warn!(
                    "candidacy lease {name} is held by another writer: is node name {} used twice?",
                    self.config.node_name
                );
            }
            Ok(Err(e)) => debug!("candidacy lease {name}: {e}"),
            Err(_) => debug!("candidacy lease {name}: no answer"),
        }
    }

    /// A renewal of lease `name` is due (a round since this node last wrote it).
    fn due(&self, name: &str) -> bool {
        self.renewed
            .get(name)
            .is_none_or(|at| at.elapsed() >= renew_every(self.config.lease_duration))
    }

    /// The candidates whose candidacy is renewed and whose Node nobody bars (this node
    /// included while it contends), each with the instant it was first seen live.
    fn update_live(
        &mut self,
        cache: &BTreeMap<String, Arc<Lease>>,
        barred: &BTreeMap<String, String>,
        contending: bool,
    ) {
        let me = self.config.node_name.clone();
        let mut live = BTreeSet::new();
        for (name, lease) in cache {
            let Some(node) = name.strip_prefix(CANDIDATE_PREFIX) else {
                continue;
            };
            if node == me || barred.contains_key(node) {
                continue;
            }
            if self.elector.standing(name, Some(lease)) == Standing::Held(node.to_owned()) {
                live.insert(node.to_owned());
            }
        }
        if contending {
            live.insert(me);
        }
        let now = Instant::now();
        let before: BTreeSet<String> = self.live.keys().cloned().collect();
        if before != live {
            info!(
                "VIP election: live candidates {}",
                live.iter().cloned().collect::<Vec<_>>().join(", ")
            );
        }
        self.live.retain(|n, _| live.contains(n));
        for n in live {
            self.live.entry(n).or_insert(now);
        }
    }

    /// One address: renew, take, hand over or leave its lease, as its standing and this
    /// node's rank say.
    async fn elect(
        &mut self,
        addr: IpAddr,
        plan: &rank::Plan,
        cache: &BTreeMap<String, Arc<Lease>>,
    ) {
        let name = lease_name(addr);
        let cached = cache.get(&name).map(|l| &**l);
        // This node is among the live candidates while it contends.
        let rank = plan.rank(addr, &self.config.node_name).unwrap_or(0);
        let preferred = plan.preferred(addr).map(str::to_owned);
        match self.elector.standing(&name, cached) {
            Standing::Mine => {
                if let Some(p) = preferred.filter(|p| self.should_hand_over(addr, p)) {
                    info!(
                        "VIP {addr}: handing over to {p}, its preferred node (live for a renew round)"
                    );
                    self.handed.insert(addr, Instant::now());
                    self.give_up(addr);
                    self.release(addr, cache).await;
                    return;
                }
                if !self.held.contains(&addr) {
                    // Held from an earlier run of this node: answer again.
                    self.take_over(addr, cache).await;
                }
                if self.due(&name) {
                    self.attempt(addr, cached).await;
                }
            }
            Standing::Held(other) => {
                self.failing.remove(&addr);
                // Handed over and taken: nothing to take back.
                self.handed.remove(&addr);
                if self.held.contains(&addr) {
                    info!("VIP {addr}: lease {name} lost to {other}: no longer answering ARP");
                    self.give_up(addr);
                }
            }
            Standing::Vacant { since } => {
                let wait = rank_step(self.config.lease_duration) * rank as u32;
                if since.elapsed() >= wait {
                    self.attempt(addr, cached).await;
                }
            }
        }
    }

    /// A holder hands `addr` over to `preferred` when that is another node, live for a renew
    /// round, and `addr` was not refused by it (taken back) within [`handover_hold`].
    fn should_hand_over(&self, addr: IpAddr, preferred: &str) -> bool {
        let renew = renew_every(self.config.lease_duration);
        preferred != self.config.node_name
            && self
                .live
                .get(preferred)
                .is_some_and(|since| since.elapsed() >= renew)
            && self
                .refused
                .get(&addr)
                .is_none_or(|at| at.elapsed() >= handover_hold(self.config.lease_duration))
    }

    /// Acquires or renews the address's lease; answers for it when held, stops when lost.
    async fn attempt(&mut self, addr: IpAddr, cached: Option<&Lease>) {
        let name = lease_name(addr);
        let what = format!("VIP {addr}");
        let result = tokio::time::timeout(
            self.api_timeout(),
            self.elector.attempt_with(&name, &what, cached),
        )
        .await;
        match result {
            Ok(Ok(Attempt::Held)) => {
                self.renewed.insert(name.clone(), Instant::now());
                if self.failing.remove(&addr) {
                    info!("VIP {addr}: lease {name} reachable again");
                }
                if !self.held.contains(&addr) {
                    let hold = handover_hold(self.config.lease_duration);
                    if self
                        .handed
                        .remove(&addr)
                        .is_some_and(|at| at.elapsed() < hold)
                    {
                        info!(
                            "VIP {addr}: taken back: its preferred node did not take it; not handed over again for {hold:?}"
                        );
                        self.refused.insert(addr, Instant::now());
                    }
                    self.announce(addr);
                }
            }
            Ok(Ok(Attempt::NotHeld)) => {
                self.failing.remove(&addr);
                if self.held.contains(&addr) {
                    info!("VIP {addr}: lease {name} lost to another node: no longer answering ARP");
                    self.give_up(addr);
                }
            }
            Ok(Err(e)) => self.failed(addr, &e.to_string()),
            Err(_) => self.failed(addr, "no answer from the API server"),
        }
    }

    /// Unknown outcome (API unreachable): keep what we have, see the module doc.
    fn failed(&mut self, addr: IpAddr, error: &str) {
        if self.failing.insert(addr) {
            warn!(
                "VIP {addr}: lease {} could not be renewed or acquired (retrying every {:?}, {}): {error}",
                lease_name(addr),
                renew_every(self.config.lease_duration),
                if self.held.contains(&addr) {
                    "still answering ARP"
                } else {
                    "not answering ARP"
                }
            );
        }
    }

    /// Answers for a lease this node holds from an earlier run; releases it if it cannot.
    async fn take_over(&mut self, addr: IpAddr, cache: &BTreeMap<String, Arc<Lease>>) {
        if !self.announce(addr) {
            self.release(addr, cache).await;
        }
    }

    /// Puts `addr` in ANNOUNCE and sends the gratuitous ARPs; `false` when it could not (then
    /// holding would leave the VIP dark: the caller lets another node take it).
    fn announce(&mut self, addr: IpAddr) -> bool {
        let Some(map) = &mut self.map else {
            return false;
        };
        if let Err(e) = map.insert(addr, self.config.iface.mac.0) {
            warn!("VIP {addr}: {e:#}; releasing the lease");
            return false;
        }
        self.held.insert(addr);
        info!(
            "VIP {addr}: lease {} acquired by {}: answering {} with {} on {}, {} sent",
            lease_name(addr),
            self.config.node_name,
            if addr.is_ipv4() {
                "ARP"
            } else {
                "neighbour solicitations"
            },
            self.config.iface.mac,
            self.config.iface.name,
            if addr.is_ipv4() {
                "gratuitous ARP"
            } else {
                "unsolicited neighbour advertisement"
            }
        );
        let iface = self.config.iface.clone();
        // Off the loop: the repeats are spaced in time.
        tokio::spawn(async move {
            for i in 0..GARP_COUNT {
                if i > 0 {
                    tokio::time::sleep(GARP_GAP).await;
                }
                let sent = match addr {
                    IpAddr::V4(v4) => net::send_gratuitous_arp(&iface, v4),
                    IpAddr::V6(v6) => net::send_unsolicited_na(&iface, v6),
                };
                if let Err(e) = sent {
                    warn!("VIP {addr}: {e:#}");
                    break;
                }
            }
        });
        true
    }

    fn give_up(&mut self, addr: IpAddr) {
        self.held.remove(&addr);
        if let Some(map) = &mut self.map
            && let Err(e) = map.remove(addr)
        {
            warn!("{e:#}");
        }
    }

    /// Clears this node as the holder of the address's lease (when it still is); `false` when
    /// the API server did not confirm it.
    async fn release(&mut self, addr: IpAddr, cache: &BTreeMap<String, Arc<Lease>>) -> bool {
        let name = lease_name(addr);
        let cached = cache.get(&name).map(|l| &**l);
        self.renewed.remove(&name);
        let released =
            tokio::time::timeout(self.api_timeout(), self.elector.release_with(&name, cached))
                .await;
        let error = match released {
            Ok(Ok(())) => {
                info!("VIP {addr}: lease {name} released");
                return true;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer from the API server".to_owned(),
        };
        warn!(
            "VIP {addr}: releasing lease {name} failed (it expires in {:?}): {error}",
            self.config.lease_duration
        );
        false
    }

    /// Stops answering for everything first, then lets the others take over: the candidacy
    /// released before the addresses, so that no other agent still ranks this node when it
    /// sees them vacant. A lease the API server does not release expires: after the first
    /// failure the rest are left to expire too.
    async fn release_all(&mut self, cache: &BTreeMap<String, Arc<Lease>>) {
        let held: Vec<IpAddr> = self.held.iter().copied().collect();
        for addr in &held {
            self.give_up(*addr);
        }
        self.candidacy(false, cache).await;
        for addr in held {
            if !self.release(addr, cache).await {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_names_are_valid_object_names() {
        assert_eq!(
            lease_name("10.0.0.1".parse().unwrap()),
            "sluice-vip-10-0-0-1"
        );
        let v6 = lease_name("fd00::1".parse().unwrap());
        assert_eq!(v6, "sluice-vip-fd00-0000-0000-0000-0000-0000-0000-0001");
        for name in [v6, lease_name("::".parse().unwrap())] {
            assert!(name.len() <= 253);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            );
            assert!(!name.ends_with('-'));
        }
    }

    /// Two renewals may fail before a lease expires, at every accepted duration.
    #[test]
    fn renewals_fit_the_lease_three_times() {
        assert_eq!(renew_every(LEASE_DURATION), RENEW_EVERY);
        for secs in [3, 5, 10, 30, 300] {
            let d = Duration::from_secs(secs);
            assert!(LEASE_DURATION_RANGE.contains(&d));
            assert!(
                renew_every(d) * 3 < d,
                "{d:?}: renew every {:?}",
                renew_every(d)
            );
        }
    }

    #[test]
    fn nodes_are_barred_by_their_node_and_by_a_quorum_of_health_votes() {
        let node = |name: &str, cordoned: bool| {
            Arc::new(
                serde_json::from_value::<Node>(serde_json::json!({
                    "metadata": {"name": name},
                    "spec": {"unschedulable": cordoned},
                    "status": {"conditions": [{"type": "Ready", "status": "True"}]},
                }))
                .expect("a Node"),
            )
        };
        let nodes = [node("a", false), node("b", true), node("c", false)];
        let drained = Drained::from([(
            ("c".to_owned(), "http:10256/healthz".to_owned()),
            vec!["a".to_owned(), "b".to_owned()],
        )]);
        let barred = barred_nodes(&nodes, Some(drained));
        assert_eq!(barred.keys().collect::<Vec<_>>(), ["b", "c"]);
        assert!(barred["b"].contains("cordoned"), "{barred:?}");
        assert!(
            barred["c"].contains("http:10256/healthz for 2"),
            "{barred:?}"
        );
        assert!(barred_nodes(&nodes[..1], None).is_empty());
    }

    #[test]
    fn namespace_flag_wins() {
        assert_eq!(lease_namespace(Some("lb".into())), "lb");
    }
}
