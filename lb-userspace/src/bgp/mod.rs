//! `sluice agent --bgp`: an announce-only BGP-4 speaker inside the agent. Every node announces
//! the /32 (/128) of each VIP it can serve to the configured routers, with identical attributes
//! (ORIGIN IGP, AS_PATH of the local AS only, no MED), so that the routers spread the VIPs'
//! traffic over all nodes by ECMP; sluice's identical Maglev tables then send every flow to the
//! same backend whichever node it reaches.
//!
//! - `wire`: the messages (fuzzed decoder), `session`: one outgoing session per peer (the FSM
//!   and timers; it never listens, so port 179 stays free for a CNI's BGP). What to announce
//!   (an [`Intent`]) is the caller's: the agent derives it from the Kubernetes model
//!   (`k8s::bgp_select`); this module knows no Kubernetes.
//! - Draining (SIGTERM, a cordon, the exclusion label): the routes are announced again with the
//!   graceful-shutdown community (RFC 8326), which routers honour by preferring the other
//!   nodes; after `drain_wait` they are withdrawn; the XDP program keeps forwarding (the agent
//!   never detaches it), so connections the router still sends here are served meanwhile.
//!
//! No graceful restart: with identical tables on every node a dead node's routes should leave
//! at once, not linger for a restart timer.

pub mod bfd;
mod metrics;
pub use metrics::BgpMetrics;
mod session;
pub mod wire;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

use ipnet::IpNet;
use log::{info, warn};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use session::{Command, Status};

/// At most this many `--bgp-communities`: with the graceful-shutdown community and every other
/// attribute an UPDATE must still have room for prefixes within 4096 bytes (the test
/// `communities_limit_leaves_room_for_prefixes` checks the worst case).
pub const MAX_COMMUNITIES: usize = 256;

/// Defaults of the flags (and of deploy/base/20-configmap.yaml).
pub const DEFAULT_HOLD_TIME: u16 = 3;
pub const DEFAULT_DRAIN_WAIT: Duration = Duration::from_secs(2);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the shutdown waits for the sessions to send their withdrawals and close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// One router to announce to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub addr: IpAddr,
    pub port: u16,
    pub asn: u32,
}

impl FromStr for Peer {
    type Err = String;

    /// `ADDRESS=ASN`, `ADDRESS:PORT=ASN` or `[IPV6]:PORT=ASN`.
    fn from_str(s: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "BGP peer {s:?}: expected ADDRESS=ASN, ADDRESS:PORT=ASN or [IPV6]:PORT=ASN, e.g. 192.0.2.1=64512"
            )
        };
        let (at, asn) = s.trim().split_once('=').ok_or_else(usage)?;
        let asn: u32 =
            asn.trim().parse().ok().filter(|a| *a != 0).ok_or_else(|| {
                format!("BGP peer {s:?}: AS number {asn:?} is not 1 to 4294967295")
            })?;
        let at = at.trim();
        let (addr, port) = if let Ok(addr) = at.parse::<IpAddr>() {
            (addr, wire::BGP_PORT)
        } else if let Ok(sa) = at.parse::<std::net::SocketAddr>() {
            (sa.ip(), sa.port())
        } else {
            return Err(usage());
        };
        Ok(Peer { addr, port, asn })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (AS {})",
            std::net::SocketAddr::new(self.addr, self.port),
            self.asn
        )
    }
}

/// A comma-separated list of peers (empty entries ignored: a ConfigMap value may be empty).
pub fn parse_peers(list: &str) -> Result<Vec<Peer>, String> {
    list.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(str::parse)
        .collect()
}

/// A comma-separated list of standard communities `HIGH:LOW` (each 0 to 65535).
pub fn parse_communities(list: &str) -> Result<Vec<u32>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(|c| {
            let bad = || {
                format!(
                    "BGP community {c:?}: expected HIGH:LOW with each 0 to 65535, e.g. 64512:100"
                )
            };
            let (h, l) = c.split_once(':').ok_or_else(bad)?;
            let h: u16 = h.parse().map_err(|_| bad())?;
            let l: u16 = l.parse().map_err(|_| bad())?;
            Ok((u32::from(h) << 16) | u32::from(l))
        })
        .collect()
}

/// The speaker's settings (flags `--bgp-*`).
#[derive(Clone, Debug)]
pub struct SpeakerConfig {
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub peers: Vec<Peer>,
    /// Proposed hold time in seconds (0 or >= 3); the session uses the smaller of both sides'.
    pub hold_time_secs: u16,
    /// Added to every route.
    pub communities: Vec<u32>,
    /// Between the graceful-shutdown announcement and the withdrawal.
    pub drain_wait: Duration,
    pub connect_timeout: Duration,
    /// BFD with every peer (single hop); `None`: off.
    pub bfd: Option<bfd::BfdConfig>,
    /// Where the speaker counts what `/metrics` shows (clones share the counts).
    pub metrics: BgpMetrics,
}

impl SpeakerConfig {
    /// Checks what the flags cannot: a usable hold time and at least one peer.
    pub fn new(
        asn: u32,
        router_id: Ipv4Addr,
        peers: Vec<Peer>,
        hold_time_secs: u16,
        communities: Vec<u32>,
        drain_wait: Duration,
    ) -> Result<Self, String> {
        if asn == 0 {
            return Err("--bgp-asn: 0 is not an AS number (1 to 4294967295)".into());
        }
        if peers.is_empty() {
            return Err("--bgp needs at least one peer: --bgp-peers ADDRESS=ASN[,...]".into());
        }
        if hold_time_secs == 1 || hold_time_secs == 2 {
            return Err(format!(
                "--bgp-hold-time {hold_time_secs}: BGP allows 0 (no keepalives) or 3 seconds and more"
            ));
        }
        if router_id.is_unspecified() {
            return Err("--bgp-router-id: 0.0.0.0 is not a router ID".into());
        }
        if communities.len() > MAX_COMMUNITIES {
            return Err(format!(
                "--bgp-communities: {} communities given, at most {MAX_COMMUNITIES} fit in a BGP UPDATE with the routes",
                communities.len()
            ));
        }
        Ok(Self {
            asn,
            router_id,
            peers,
            hold_time_secs,
            communities,
            drain_wait,
            connect_timeout: CONNECT_TIMEOUT,
            bfd: None,
            metrics: BgpMetrics::default(),
        })
    }

    #[cfg(test)]
    fn for_tests(asn: u32) -> Self {
        Self {
            asn,
            router_id: Ipv4Addr::new(192, 0, 2, 10),
            peers: Vec::new(),
            hold_time_secs: 3,
            communities: Vec::new(),
            drain_wait: Duration::from_millis(100),
            connect_timeout: CONNECT_TIMEOUT,
            bfd: None,
            metrics: BgpMetrics::default(),
        }
    }
}

/// How one route is announced.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// With the RFC 8326 community 65535:0 (draining).
    pub graceful_shutdown: bool,
}

/// The routes a session keeps announced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes(pub BTreeMap<IpNet, RouteAttrs>);

impl Routes {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn clear(&mut self) {
        self.0.clear();
    }
    fn filtered(&self, keep: impl Fn(&IpNet) -> bool) -> Self {
        Self(
            self.0
                .iter()
                .filter(|(p, _)| keep(p))
                .map(|(p, a)| (*p, *a))
                .collect(),
        )
    }
    fn of(addrs: &BTreeSet<IpAddr>, attrs: RouteAttrs) -> Self {
        Self(addrs.iter().map(|a| (IpNet::from(*a), attrs)).collect())
    }
}

/// What this node should announce: the addresses it can serve, and whether it is draining
/// (why, for the log).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub addrs: BTreeSet<IpAddr>,
    pub drain: Option<String>,
}

/// The running speaker: one session task per peer and the task that turns intents into routes.
pub struct Speaker {
    intent: watch::Sender<Intent>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// BFD: stopped after the sessions closed (its AdminDown would otherwise end them early).
    bfd: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    bfd_drops: Option<std::sync::Arc<bfd::Drops>>,
}

impl Speaker {
    /// Starts the sessions, BFD and the task that turns intents into routes on `runtime`: the
    /// agent gives it a runtime of their own (its `timers` thread), so that keepalives, hold
    /// timers and BFD's 100 ms transmissions are never late behind a model build. The speaker
    /// is driven through sync channels, which work from any runtime or thread. Nothing is
    /// announced before `ready` turns true (the dataplane has applied the first model).
    pub fn start(
        config: SpeakerConfig,
        ready: watch::Receiver<bool>,
        runtime: &tokio::runtime::Handle,
    ) -> anyhow::Result<Speaker> {
        // The BFD sockets register with `runtime`'s I/O driver.
        let _in_runtime = runtime.enter();
        let (intent, intent_rx) = watch::channel(Intent::default());
        let (stop, stop_rx) = watch::channel(false);
        info!(
            "BGP: AS {}, router ID {}, hold time {}s, peers {}",
            config.asn,
            config.router_id,
            config.hold_time_secs,
            config
                .peers
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut bfd_peers = Vec::new();
        let mut sessions = Vec::new();
        for peer in &config.peers {
            let (cmd_tx, cmd_rx) = watch::channel(Command::Run(Routes::new()));
            let (status_tx, status_rx) = watch::channel(Status::default());
            // One BFD session per address (two BGP sessions to one router share it).
            let bfd_link = config.bfd.map(|_| {
                match bfd_peers
                    .iter()
                    .position(|p: &bfd::BfdPeer| p.addr == peer.addr)
                {
                    Some(i) => bfd_peers[i].link.subscribe(),
                    None => {
                        let (link, rx) = watch::channel(bfd::Link::Waiting);
                        bfd_peers.push(bfd::BfdPeer {
                            addr: peer.addr,
                            port: bfd::BFD_PORT,
                            link,
                        });
                        rx
                    }
                }
            });
            runtime.spawn(session::run(
                config.clone(),
                peer.clone(),
                cmd_rx,
                status_tx,
                bfd_link,
            ));
            config
                .metrics
                .add_session(peer.to_string(), status_rx.clone());
            sessions.push((cmd_tx, status_rx));
        }
        let mut bfd_drops = None;
        let bfd = match config.bfd {
            Some(cfg) if !bfd_peers.is_empty() => {
                let addrs: Vec<IpAddr> = bfd_peers.iter().map(|p| p.addr).collect();
                let sockets = bfd::Sockets::for_peers(&addrs)?;
                let bfd = bfd::Bfd::new(cfg, sockets, bfd_peers)?
                    .counting_drops_in(config.metrics.bfd_drops.clone());
                bfd_drops = Some(bfd.drops());
                let (bfd_stop, bfd_stop_rx) = watch::channel(false);
                let task = runtime.spawn(bfd.run(bfd_stop_rx));
                Some((bfd_stop, task))
            }
            _ => None,
        };
        let task = runtime.spawn(manage(config, intent_rx, stop_rx, ready, sessions));
        Ok(Speaker {
            intent,
            stop,
            task,
            bfd,
            bfd_drops,
        })
    }

    /// BFD packets dropped so far, by reason (`None` without BFD).
    pub fn bfd_drops(&self) -> Option<bfd::DropCounts> {
        self.bfd_drops.as_ref().map(|d| d.counts())
    }

    /// The newest intent (cheap when unchanged).
    pub fn set(&self, intent: Intent) {
        self.intent
            .send_if_modified(|old| std::mem::replace(old, intent) != *old);
    }

    /// Drains (graceful shutdown, wait, withdraw) and closes every session. May be awaited on
    /// another runtime than the speaker's, which must run until this returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            warn!("BGP: the speaker task failed: {e}");
        }
        if let Some((stop, task)) = self.bfd {
            let _ = stop.send(true);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, task).await;
        }
    }
}

type Sessions = Vec<(watch::Sender<Command>, watch::Receiver<Status>)>;

fn publish(sessions: &Sessions, routes: &Routes) {
    for (tx, _) in sessions {
        tx.send_if_modified(|old| {
            let new = Command::Run(routes.clone());
            std::mem::replace(old, new.clone()) != new
        });
    }
}

fn any_established(sessions: &Sessions) -> bool {
    sessions.iter().any(|(_, s)| s.borrow().established)
}

/// Turns intents into the routes every session announces, timing the drains.
async fn manage(
    config: SpeakerConfig,
    mut intents: watch::Receiver<Intent>,
    mut stop: watch::Receiver<bool>,
    mut ready: watch::Receiver<bool>,
    sessions: Sessions,
) {
    // Announce nothing until the dataplane forwards.
    tokio::select! {
        r = until_true(&mut ready) => { if !r { return; } }
        _ = until_true(&mut stop) => { close(&sessions).await; return; }
    }
    // When the current drain started (None: not draining).
    let mut draining: Option<Instant> = None;
    let mut routes;
    loop {
        let intent = intents.borrow_and_update().clone();
        let now = Instant::now();
        match &intent.drain {
            None => {
                if draining.take().is_some() {
                    info!("BGP: no longer draining: announcing again");
                }
                routes = Routes::of(&intent.addrs, RouteAttrs::default());
            }
            Some(why) => {
                let since = *draining.get_or_insert_with(|| {
                    info!(
                        "BGP: draining ({why}): announcing with graceful-shutdown 65535:0, withdrawing in {:?}",
                        config.drain_wait
                    );
                    now
                });
                routes = if now < since + config.drain_wait {
                    Routes::of(
                        &intent.addrs,
                        RouteAttrs {
                            graceful_shutdown: true,
                        },
                    )
                } else {
                    Routes::new()
                };
            }
        }
        publish(&sessions, &routes);
        let drain_ends = draining
            .map(|s| s + config.drain_wait)
            .filter(|end| *end > now);
        tokio::select! {
            changed = intents.changed() => { if changed.is_err() { break; } }
            _ = tokio::time::sleep_until(drain_ends.unwrap_or(now)), if drain_ends.is_some() => {}
            _ = until_true(&mut stop) => break,
        }
    }
    // Shutdown: drain what is announced (unless nobody hears it), then close.
    if !routes.is_empty() && any_established(&sessions) {
        let gshut = Routes(
            routes
                .0
                .keys()
                .map(|p| {
                    (
                        *p,
                        RouteAttrs {
                            graceful_shutdown: true,
                        },
                    )
                })
                .collect(),
        );
        let wait = match draining {
            Some(since) => (since + config.drain_wait).saturating_duration_since(Instant::now()),
            None => config.drain_wait,
        };
        info!(
            "BGP: stopping: announcing with graceful-shutdown 65535:0, withdrawing in {wait:?}, then closing"
        );
        publish(&sessions, &gshut);
        tokio::time::sleep(wait).await;
    }
    publish(&sessions, &Routes::new());
    close(&sessions).await;
}

/// Waits until `rx` holds true; false when its sender is gone first.
async fn until_true(rx: &mut watch::Receiver<bool>) -> bool {
    rx.wait_for(|v| *v).await.is_ok()
}

/// Withdraws everything and closes the sessions, waiting (bounded) for them to finish.
async fn close(sessions: &Sessions) {
    for (tx, _) in sessions {
        let _ = tx.send(Command::Close);
    }
    for (_, status) in sessions {
        let mut status = status.clone();
        let closed = async move { status.wait_for(|s| s.closed).await.is_ok() };
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
    }
    info!("BGP: all sessions closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_parse_with_ports_and_v6() {
        let p =
            parse_peers("192.0.2.1=64512, [2001:db8::1]:1179=4200000000,,10.0.0.1:180=1").unwrap();
        assert_eq!(
            p,
            vec![
                Peer {
                    addr: "192.0.2.1".parse().unwrap(),
                    port: 179,
                    asn: 64512
                },
                Peer {
                    addr: "2001:db8::1".parse().unwrap(),
                    port: 1179,
                    asn: 4_200_000_000
                },
                Peer {
                    addr: "10.0.0.1".parse().unwrap(),
                    port: 180,
                    asn: 1
                },
            ]
        );
        assert!(parse_peers("").unwrap().is_empty());
        for bad in ["192.0.2.1", "192.0.2.1=0", "x=1", "192.0.2.1=4294967296"] {
            let e = parse_peers(bad).unwrap_err();
            assert!(e.contains("BGP peer"), "{e}");
        }
    }

    #[test]
    fn communities_parse() {
        assert_eq!(
            parse_communities("64512:100, 65535:65281").unwrap(),
            vec![(64512 << 16) | 100, 0xffff_ff01]
        );
        assert!(parse_communities("").unwrap().is_empty());
        assert!(parse_communities("65536:1").is_err());
        assert!(parse_communities("100").is_err());
    }

    #[test]
    fn config_checks() {
        let peers = parse_peers("192.0.2.1=65000").unwrap();
        let id = Ipv4Addr::new(192, 0, 2, 10);
        let d = DEFAULT_DRAIN_WAIT;
        assert!(SpeakerConfig::new(64512, id, peers.clone(), 3, vec![], d).is_ok());
        assert!(SpeakerConfig::new(64512, id, peers.clone(), 2, vec![], d).is_err());
        assert!(SpeakerConfig::new(64512, id, vec![], 3, vec![], d).is_err());
        assert!(SpeakerConfig::new(0, id, peers, 3, vec![], d).is_err());
    }

    /// An unbounded community list is refused at start, naming the flag and the limit.
    #[test]
    fn too_many_communities_are_refused() {
        let peers = parse_peers("192.0.2.1=65000").unwrap();
        let id = Ipv4Addr::new(192, 0, 2, 10);
        let d = DEFAULT_DRAIN_WAIT;
        let list: Vec<String> = (0..2000u32).map(|i| format!("64512:{i}")).collect();
        let many = parse_communities(&list.join(",")).unwrap();
        let e = SpeakerConfig::new(64512, id, peers.clone(), 3, many.clone(), d).unwrap_err();
        assert!(e.contains("--bgp-communities") && e.contains("256"), "{e}");
        let e =
            SpeakerConfig::new(64512, id, peers.clone(), 3, many[..257].to_vec(), d).unwrap_err();
        assert!(e.contains("--bgp-communities"), "{e}");
        assert!(SpeakerConfig::new(64512, id, peers, 3, many[..256].to_vec(), d).is_ok());
    }

    /// The limit is safe: the largest UPDATE this speaker builds (every attribute, the
    /// maximum communities plus graceful shutdown, 2-octet AS with AS4_PATH, IPv6 next hop)
    /// still has room for a /128 within 4096 bytes.
    #[test]
    fn communities_limit_leaves_room_for_prefixes() {
        use wire::{AFI_IPV6, Attribute, Context, SAFI_UNICAST, Segment};
        let mut communities = vec![0xfc00_0001; MAX_COMMUNITIES];
        communities.push(wire::GRACEFUL_SHUTDOWN);
        let path = vec![Segment {
            kind: wire::AS_SEQUENCE,
            asns: vec![4_200_000_000],
        }];
        let attrs = vec![
            Attribute::Origin(0),
            Attribute::AsPath(path.clone()),
            Attribute::NextHop(Ipv4Addr::new(192, 0, 2, 10)),
            Attribute::LocalPref(100),
            Attribute::Communities(communities),
            Attribute::As4Path(path),
            Attribute::MpReach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                next_hop: vec![0; 16],
                nlri: vec!["2001:db8::1/128".parse().unwrap()],
            },
        ];
        for four_octet_as in [false, true] {
            let used = wire::update_overhead(&attrs, Context { four_octet_as }) + 2;
            assert!(used <= wire::MAX_MESSAGE_LEN / 2, "{used}");
        }
    }
}
