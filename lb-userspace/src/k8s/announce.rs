//! sluice's own L2 announcement (`sluice agent --announce`): the agents elect one node per VIP
//! address with a `coordination.k8s.io/v1` Lease in their namespace; the holder writes the
//! address into the `ANNOUNCE` map, so that its XDP program answers ARP (IPv6: Neighbor
//! Solicitations) for it (and only forwards: the node never terminates VIP traffic), and sends
//! gratuitous ARP (IPv6: unsolicited Neighbor Advertisements) on takeover so that clients and
//! switches move to its MAC at once.
//!
//! The election is `lease::Elector`'s (compare-and-swap on the Lease, expiry by this agent's
//! own clock). A node that must not attract VIP traffic (cordoned, NotReady, or labelled
//! `node.kubernetes.io/exclude-from-external-load-balancers`: [`Announceable::blocked`]) does
//! not contend, and releases what it holds at once, so another node takes over within one
//! renew round instead of the lease duration.
//!
//! While the API server cannot be reached the holder keeps answering: nobody else can win the
//! lease meanwhile, and should two nodes answer for a while both forward identically (the same
//! maps, the same Maglev tables), so a client reaches the same backends through either.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use kube::{Api, Client};
use log::{debug, info, warn};
use tokio::sync::watch;

use super::lease::{Attempt, Elector};
use crate::dataplane::{AnnounceMap, PinLayout};
use crate::net::{self, Interface};

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

/// What the announcer should contend for: the addresses this node may announce, and why it
/// must announce none of them right now (its Node is cordoned, NotReady or excluded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Announceable {
    pub addrs: BTreeSet<IpAddr>,
    pub blocked: Option<String>,
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

/// The per-address election loop and what it holds.
struct Announcer {
    elector: Elector,
    config: AnnounceConfig,
    map: Option<AnnounceMap>,
    /// Addresses whose lease this node holds (and which are in ANNOUNCE).
    held: BTreeSet<IpAddr>,
    /// Addresses whose last attempt failed (logged once per streak).
    failing: BTreeSet<IpAddr>,
    /// Why this node does not contend now (logged once per change).
    blocked: Option<String>,
}

/// Runs the elections for the addresses in `addrs` until `stop` turns true; then removes this
/// node's ANNOUNCE entries and releases its leases, so that another node takes over at once.
pub async fn run(
    client: Client,
    config: AnnounceConfig,
    mut addrs: watch::Receiver<Announceable>,
    mut stop: watch::Receiver<bool>,
) {
    let mut a = Announcer {
        elector: Elector::new(
            Api::namespaced(client, &config.namespace),
            config.node_name.clone(),
            config.lease_duration,
        ),
        config,
        map: None,
        held: BTreeSet::new(),
        failing: BTreeSet::new(),
        blocked: None,
    };
    let renew = renew_every(a.config.lease_duration);
    info!(
        "announcing VIPs: one node per address by Lease in namespace {} (as {}, ARP and neighbour solicitations answered from {} {}; leases of {:?}, renewed every {renew:?})",
        a.config.namespace,
        a.config.node_name,
        a.config.iface.name,
        a.config.iface.mac,
        a.config.lease_duration
    );
    loop {
        let wanted = addrs.borrow_and_update().clone();
        a.set_blocked(wanted.blocked.clone());
        let contended = if a.blocked.is_some() {
            BTreeSet::new()
        } else {
            wanted.addrs
        };
        a.tick(&contended).await;
        // Until the reconcile thread has attached (ANNOUNCE pinned), look again soon.
        let next = if a.map.is_some() { renew } else { MAP_RETRY };
        tokio::select! {
            _ = tokio::time::sleep(next) => {}
            changed = addrs.changed() => { if changed.is_err() { break; } }
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
    }
    a.release_all().await;
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

    /// One round: the ANNOUNCE map opened (once the reconcile thread has attached), every wanted
    /// address's lease acquired or renewed, addresses no longer served released.
    async fn tick(&mut self, wanted: &BTreeSet<IpAddr>) {
        if self.map.is_none() {
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
                }
                Err(e) => {
                    // Not attached yet: no election before this node can answer.
                    debug!("announce: ANNOUNCE map not open yet: {e:#}");
                    return;
                }
            }
        }
        for addr in wanted {
            match self.attempt(*addr).await {
                Ok(Attempt::Held) => {
                    if self.failing.remove(addr) {
                        info!("VIP {addr}: lease {} reachable again", lease_name(*addr));
                    }
                    if !self.held.contains(addr) {
                        self.take_over(*addr).await;
                    }
                }
                Ok(Attempt::NotHeld) => {
                    self.failing.remove(addr);
                    if self.held.contains(addr) {
                        info!(
                            "VIP {addr}: lease {} lost to another node: no longer answering ARP",
                            lease_name(*addr)
                        );
                        self.give_up(*addr);
                    }
                }
                Err(e) => {
                    // Unknown outcome (API unreachable): keep what we have, see the module doc.
                    if self.failing.insert(*addr) {
                        warn!(
                            "VIP {addr}: lease {} could not be renewed or acquired (retrying every {:?}, {}): {e}",
                            lease_name(*addr),
                            renew_every(self.config.lease_duration),
                            if self.held.contains(addr) {
                                "still answering ARP"
                            } else {
                                "not answering ARP"
                            }
                        );
                    }
                }
            }
        }
        let gone: Vec<IpAddr> = self.held.difference(wanted).copied().collect();
        for addr in gone {
            if self.blocked.is_none() {
                info!("VIP {addr}: no longer served: releasing its lease");
            }
            self.give_up(addr);
            self.release(addr).await;
        }
        self.elector
            .forget_except(|name| wanted.iter().any(|a| lease_name(*a) == name));
    }

    async fn take_over(&mut self, addr: IpAddr) {
        let Some(map) = &mut self.map else { return };
        if let Err(e) = map.insert(addr, self.config.iface.mac.0) {
            // Holding without answering would leave the VIP dark: let another node take it.
            warn!("VIP {addr}: {e:#}; releasing the lease");
            self.release(addr).await;
            return;
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
    }

    fn give_up(&mut self, addr: IpAddr) {
        self.held.remove(&addr);
        if let Some(map) = &mut self.map
            && let Err(e) = map.remove(addr)
        {
            warn!("{e:#}");
        }
    }

    async fn attempt(&mut self, addr: IpAddr) -> Result<Attempt, kube::Error> {
        self.elector
            .attempt(&lease_name(addr), &format!("VIP {addr}"))
            .await
    }

    /// Clears this node as the holder of the address's lease (when it still is).
    async fn release(&mut self, addr: IpAddr) {
        let name = lease_name(addr);
        match self.elector.release(&name).await {
            Ok(()) => info!("VIP {addr}: lease {name} released"),
            Err(e) => warn!(
                "VIP {addr}: releasing lease {name} failed (it expires in {:?}): {e}",
                self.config.lease_duration
            ),
        }
    }

    /// On shutdown: stop answering first, then let the others take over.
    async fn release_all(&mut self) {
        let held: Vec<IpAddr> = self.held.iter().copied().collect();
        for addr in held {
            self.give_up(addr);
            self.release(addr).await;
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
    fn namespace_flag_wins() {
        assert_eq!(lease_namespace(Some("lb".into())), "lb");
    }
}
