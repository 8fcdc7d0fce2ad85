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
mod socket;
pub mod view;
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
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    pub addr: IpAddr,
    pub port: u16,
    pub asn: u32,
    /// What differs from the speaker's defaults for this peer (a `BGPPeer`'s fields).
    pub options: PeerOptions,
}

/// A peer's own settings; each `None` takes the speaker's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct PeerOptions {
    /// This node's AS towards the peer [default: `--bgp-asn`] (a rack of its own AS).
    pub local_asn: Option<u32>,
    /// The address the session is opened from [default: the kernel's choice].
    pub source: Option<IpAddr>,
    /// Proposed hold time in seconds [default: `--bgp-hold-time`].
    pub hold_time_secs: Option<u16>,
    /// eBGP multihop: the TTL of the session's packets (the router is this many hops away)
    /// [default: the kernel's TTL].
    pub ebgp_multihop: Option<u8>,
    /// GTSM (RFC 5082, TTL security): send with TTL 255 and accept only packets that came at
    /// most this many hops (1: directly connected). Excludes `ebgp_multihop`.
    pub ttl_security_hops: Option<u8>,
    /// BFD with this peer (the agent's `--bgp-bfd-*` timing).
    pub bfd: bool,
    /// The TCP-MD5 password (RFC 2385) the peer expects.
    pub password: Option<Password>,
}

/// A TCP-MD5 key: never shown (Debug and Display print its length only).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Password(String);

impl Password {
    /// Checks what the kernel takes: 1 to 80 bytes. Surrounding white space (a file's final
    /// newline) is not part of it.
    pub fn new(text: &str) -> Result<Password, String> {
        let text = text.trim();
        if text.is_empty() || text.len() > socket::MD5_MAX_KEY_LEN {
            return Err(format!(
                "a TCP-MD5 password has 1 to {} bytes, this one {}",
                socket::MD5_MAX_KEY_LEN,
                text.len()
            ));
        }
        Ok(Password(text.to_owned()))
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Password({} bytes)", self.0.len())
    }
}

impl Peer {
    /// A peer with the speaker's defaults.
    pub fn new(addr: IpAddr, port: u16, asn: u32) -> Peer {
        Peer {
            addr,
            port,
            asn,
            options: PeerOptions::default(),
        }
    }

    /// This node's AS towards the peer.
    pub fn local_asn(&self, config: &SpeakerConfig) -> u32 {
        self.options.local_asn.unwrap_or(config.asn)
    }

    /// The hold time proposed to the peer.
    pub fn hold_time_secs(&self, config: &SpeakerConfig) -> u16 {
        self.options.hold_time_secs.unwrap_or(config.hold_time_secs)
    }

    /// Checks the options the flags and the CRD cannot: a usable hold time, one TTL rule.
    pub fn check(&self) -> Result<(), String> {
        let o = &self.options;
        if let Some(h @ (1 | 2)) = o.hold_time_secs {
            return Err(format!(
                "BGP peer {self}: hold time {h}: BGP allows 0 (no keepalives) or 3 seconds and more"
            ));
        }
        if o.local_asn == Some(0) || self.asn == 0 {
            return Err(format!("BGP peer {self}: 0 is not an AS number"));
        }
        if o.ebgp_multihop.is_some() && o.ttl_security_hops.is_some() {
            return Err(format!(
                "BGP peer {self}: eBGP multihop and TTL security exclude each other (TTL security sends with TTL 255)"
            ));
        }
        if o.ebgp_multihop == Some(0) || o.ttl_security_hops == Some(0) {
            return Err(format!("BGP peer {self}: a hop count is 1 to 255"));
        }
        if let Some(source) = o.source
            && source.is_ipv4() != self.addr.is_ipv4()
        {
            return Err(format!(
                "BGP peer {self}: source address {source} is not of the peer's family"
            ));
        }
        Ok(())
    }
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
        Ok(Peer::new(addr, port, asn))
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
    /// BFD's timing with the peers that run it (single hop; `PeerOptions::bfd`).
    pub bfd: bfd::BfdConfig,
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
        for p in &peers {
            p.check()?;
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
            bfd: bfd::BfdConfig::default(),
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
            bfd: bfd::BfdConfig::default(),
            metrics: BgpMetrics::default(),
        }
    }
}

/// What an address pool adds to the routes of its addresses (`IPAddressPool.spec.bgp`), so
/// that operators can steer traffic per class of Service.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PoolAdvert {
    /// Standard communities, after `--bgp-communities`.
    pub communities: Vec<u32>,
    /// LOCAL_PREF towards iBGP peers [default: 100]; never sent to eBGP peers (RFC 4271).
    pub local_pref: Option<u32>,
}

/// At most this many communities per pool: with `MAX_COMMUNITIES` of the flag and graceful
/// shutdown an UPDATE still has room for prefixes (`communities_limit_leaves_room_for_prefixes`).
pub const MAX_POOL_COMMUNITIES: usize = 32;

/// How one route is announced.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RouteAttrs {
    /// With the RFC 8326 community 65535:0 (draining).
    pub graceful_shutdown: bool,
    /// Its pool's communities and LOCAL_PREF.
    pub pool: PoolAdvert,
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
                .map(|(p, a)| (*p, a.clone()))
                .collect(),
        )
    }
    /// The routes of `intent`'s addresses, each with its pool's attributes.
    fn of(intent: &Intent, graceful_shutdown: bool) -> Self {
        Self(
            intent
                .addrs
                .iter()
                .map(|a| {
                    let attrs = RouteAttrs {
                        graceful_shutdown,
                        pool: intent.adverts.get(a).cloned().unwrap_or_default(),
                    };
                    (IpNet::from(*a), attrs)
                })
                .collect(),
        )
    }
}

/// What this node should announce: the addresses it can serve, and whether it is draining
/// (why, for the log).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Intent {
    pub addrs: BTreeSet<IpAddr>,
    pub drain: Option<String>,
    /// The attributes of the addresses whose pool sets some.
    pub adverts: BTreeMap<IpAddr, PoolAdvert>,
}

/// The running speaker: one session task per peer and the task that turns intents into routes.
pub struct Speaker {
    intent: watch::Sender<Intent>,
    /// The peers besides the configured ones (the `BGPPeer`s that select this node).
    extra_peers: watch::Sender<Vec<Peer>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
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
        let (intent, intent_rx) = watch::channel(Intent::default());
        let (extra_peers, extra_rx) = watch::channel(Vec::new());
        let (stop, stop_rx) = watch::channel(false);
        info!(
            "BGP: AS {}, router ID {}, hold time {}s, peers {}",
            config.asn,
            config.router_id,
            config.hold_time_secs,
            if config.peers.is_empty() {
                "none configured (BGPPeers only)".to_owned()
            } else {
                config
                    .peers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        // Fails here, not in the task, when BFD's sockets cannot be made.
        let mut sessions = Sessions::default();
        {
            let _in_runtime = runtime.enter();
            sessions.reconcile(&config, &config.peers)?;
        }
        let task = runtime.spawn(manage(
            config, intent_rx, extra_rx, stop_rx, ready, sessions,
        ));
        Ok(Speaker {
            intent,
            extra_peers,
            stop,
            task,
        })
    }

    /// The newest intent (cheap when unchanged).
    pub fn set(&self, intent: Intent) {
        self.intent
            .send_if_modified(|old| std::mem::replace(old, intent) != *old);
    }

    /// The peers besides the configured ones (cheap when unchanged): sessions to new peers
    /// start, those to peers no longer listed withdraw and close, a changed peer's restarts.
    pub fn set_extra_peers(&self, mut peers: Vec<Peer>) {
        peers.sort();
        peers.dedup();
        self.extra_peers
            .send_if_modified(|old| std::mem::replace(old, peers) != *old);
    }

    /// Drains (graceful shutdown, wait, withdraw) and closes every session. May be awaited on
    /// another runtime than the speaker's, which must run until this returns.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            warn!("BGP: the speaker task failed: {e}");
        }
    }
}

/// One running session.
struct Handle {
    commands: watch::Sender<Command>,
    status: watch::Receiver<Status>,
}

/// BFD with the peers that run it: one task for all of them.
struct BfdRunning {
    addrs: BTreeSet<IpAddr>,
    links: BTreeMap<IpAddr, watch::Receiver<bfd::Link>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The sessions by peer, and BFD.
#[derive(Default)]
struct Sessions {
    running: BTreeMap<Peer, Handle>,
    bfd: Option<BfdRunning>,
}

impl Sessions {
    /// Makes the sessions those of `peers` (a peer whose settings changed is another peer: its
    /// old session closes, a new one starts). When the set of BFD addresses changes, BFD
    /// restarts with it, and so do the sessions that use it (their link is BFD's).
    fn reconcile(&mut self, config: &SpeakerConfig, peers: &[Peer]) -> anyhow::Result<()> {
        // One session per router address and port: the first peer listed wins (the flags'
        // before the BGPPeers, those in name order).
        let mut wanted: BTreeSet<&Peer> = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for p in peers {
            if let Err(e) = p.check() {
                warn!("BGP: {e}: no session");
            } else if !seen.insert((p.addr, p.port)) {
                warn!("BGP peer {p}: configured twice; the first configuration is used");
            } else {
                wanted.insert(p);
            }
        }
        let bfd_addrs: BTreeSet<IpAddr> = wanted
            .iter()
            .filter(|p| p.options.bfd)
            .map(|p| p.addr)
            .collect();
        let bfd_changed = self.bfd.as_ref().map(|b| &b.addrs) != Some(&bfd_addrs)
            && !(self.bfd.is_none() && bfd_addrs.is_empty());
        let gone: Vec<Peer> = self
            .running
            .keys()
            .filter(|p| !wanted.contains(p) || (bfd_changed && p.options.bfd))
            .cloned()
            .collect();
        for peer in gone {
            if let Some(h) = self.running.remove(&peer) {
                info!("BGP peer {peer}: no longer configured here: closing the session");
                let _ = h.commands.send(Command::Close);
                config.metrics.remove_session(&peer);
            }
        }
        if bfd_changed {
            if let Some(old) = self.bfd.take() {
                let _ = old.stop.send(true);
                old.task.abort();
            }
            if !bfd_addrs.is_empty() {
                self.bfd = Some(start_bfd(config, &bfd_addrs)?);
            }
        }
        let routes = self
            .running
            .values()
            .next()
            .map(|h| h.commands.borrow().clone())
            .unwrap_or(Command::Run(Routes::new()));
        for peer in wanted {
            if self.running.contains_key(peer) {
                continue;
            }
            let (commands, cmd_rx) = watch::channel(routes.clone());
            let (status_tx, status) = watch::channel(Status::default());
            let link = self
                .bfd
                .as_ref()
                .filter(|_| peer.options.bfd)
                .and_then(|b| b.links.get(&peer.addr).cloned());
            config
                .metrics
                .add_session(peer, peer.local_asn(config), status.clone(), link.clone());
            tokio::spawn(session::run(
                config.clone(),
                peer.clone(),
                cmd_rx,
                status_tx,
                link,
            ));
            self.running
                .insert(peer.clone(), Handle { commands, status });
        }
        Ok(())
    }

    fn publish(&self, routes: &Routes) {
        for h in self.running.values() {
            h.commands.send_if_modified(|old| {
                let new = Command::Run(routes.clone());
                std::mem::replace(old, new.clone()) != new
            });
        }
    }

    fn any_established(&self) -> bool {
        self.running.values().any(|h| h.status.borrow().established)
    }

    /// Withdraws everything and closes the sessions, waiting (bounded) for them to finish,
    /// then stops BFD (its AdminDown would otherwise end them early).
    async fn close(&mut self) {
        for h in self.running.values() {
            let _ = h.commands.send(Command::Close);
        }
        for h in self.running.values() {
            let mut status = h.status.clone();
            let closed = async move { status.wait_for(|s| s.closed).await.is_ok() };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
        }
        if let Some(b) = self.bfd.take() {
            let _ = b.stop.send(true);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, b.task).await;
        }
        info!("BGP: all sessions closed");
    }
}

/// BFD with `addrs` (one BFD session per address: two BGP sessions to one router share it).
fn start_bfd(config: &SpeakerConfig, addrs: &BTreeSet<IpAddr>) -> anyhow::Result<BfdRunning> {
    let mut peers = Vec::new();
    let mut links = BTreeMap::new();
    for addr in addrs {
        let (link, rx) = watch::channel(bfd::Link::Waiting);
        peers.push(bfd::BfdPeer {
            addr: *addr,
            port: bfd::BFD_PORT,
            link,
        });
        links.insert(*addr, rx);
    }
    let list: Vec<IpAddr> = addrs.iter().copied().collect();
    let sockets = bfd::Sockets::for_peers(&list)?;
    let bfd = bfd::Bfd::new(config.bfd, sockets, peers)?
        .counting_drops_in(config.metrics.bfd_drops.clone());
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(bfd.run(stop_rx));
    Ok(BfdRunning {
        addrs: addrs.clone(),
        links,
        stop,
        task,
    })
}

/// The configured peers and `extra` (`BGPPeer`s) become the sessions.
fn follow_peers(config: &SpeakerConfig, sessions: &mut Sessions, extra: &[Peer]) {
    let mut all = config.peers.clone();
    all.extend(extra.iter().cloned());
    if let Err(e) = sessions.reconcile(config, &all) {
        warn!("BGP: following the peers: {e:#}");
    }
}

/// Turns intents into the routes every session announces, timing the drains, and follows
/// the peers.
async fn manage(
    config: SpeakerConfig,
    mut intents: watch::Receiver<Intent>,
    mut extra_peers: watch::Receiver<Vec<Peer>>,
    mut stop: watch::Receiver<bool>,
    mut ready: watch::Receiver<bool>,
    mut sessions: Sessions,
) {
    // Announce nothing until the dataplane forwards (the sessions may come up meanwhile).
    loop {
        tokio::select! {
            r = until_true(&mut ready) => { if !r { return; } break; }
            _ = until_true(&mut stop) => { sessions.close().await; return; }
            changed = extra_peers.changed() => {
                if changed.is_ok() {
                    let extra = extra_peers.borrow_and_update().clone();
                    follow_peers(&config, &mut sessions, &extra);
                }
            }
        }
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
                routes = Routes::of(&intent, false);
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
                    Routes::of(&intent, true)
                } else {
                    Routes::new()
                };
            }
        }
        sessions.publish(&routes);
        let drain_ends = draining
            .map(|s| s + config.drain_wait)
            .filter(|end| *end > now);
        tokio::select! {
            changed = intents.changed() => { if changed.is_err() { break; } }
            changed = extra_peers.changed() => {
                if changed.is_ok() {
                    let extra = extra_peers.borrow_and_update().clone();
                    follow_peers(&config, &mut sessions, &extra);
                }
            }
            _ = tokio::time::sleep_until(drain_ends.unwrap_or(now)), if drain_ends.is_some() => {}
            _ = until_true(&mut stop) => break,
        }
    }
    // Shutdown: drain what is announced (unless nobody hears it), then close.
    if !routes.is_empty() && sessions.any_established() {
        let gshut = Routes(
            routes
                .0
                .iter()
                .map(|(p, a)| {
                    let attrs = RouteAttrs {
                        graceful_shutdown: true,
                        ..a.clone()
                    };
                    (*p, attrs)
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
        sessions.publish(&gshut);
        tokio::time::sleep(wait).await;
    }
    sessions.publish(&Routes::new());
    sessions.close().await;
}

/// Waits until `rx` holds true; false when its sender is gone first.
async fn until_true(rx: &mut watch::Receiver<bool>) -> bool {
    rx.wait_for(|v| *v).await.is_ok()
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
                Peer::new("192.0.2.1".parse().unwrap(), 179, 64512),
                Peer::new("2001:db8::1".parse().unwrap(), 1179, 4_200_000_000),
                Peer::new("10.0.0.1".parse().unwrap(), 180, 1),
            ]
        );
        assert!(parse_peers("").unwrap().is_empty());
        for bad in ["192.0.2.1", "192.0.2.1=0", "x=1", "192.0.2.1=4294967296"] {
            let e = parse_peers(bad).unwrap_err();
            assert!(e.contains("BGP peer"), "{e}");
        }
    }

    /// Passwords: 1 to 80 bytes (TCP_MD5SIG_MAXKEYLEN), a file's newline trimmed, never shown.
    #[test]
    fn passwords_are_checked_and_never_shown() {
        assert!(Password::new(&"x".repeat(80)).is_ok());
        assert!(Password::new(&"x".repeat(81)).is_err());
        assert!(Password::new(" \n").is_err());
        let p = Password::new("s3cret\n").unwrap();
        assert_eq!(p.bytes(), b"s3cret");
        assert_eq!(format!("{p:?}"), "Password(6 bytes)");
        let mut peer = Peer::new("192.0.2.1".parse().unwrap(), 179, 65000);
        peer.options.password = Some(p);
        assert!(!format!("{peer:?}").contains("s3cret"));
    }

    /// A peer's own settings are checked: hold time, one TTL rule, the source's family.
    #[test]
    fn peer_options_are_checked() {
        let peer = |o: PeerOptions| Peer {
            options: o,
            ..Peer::new("192.0.2.1".parse().unwrap(), 179, 65000)
        };
        assert!(peer(PeerOptions::default()).check().is_ok());
        for bad in [
            PeerOptions {
                hold_time_secs: Some(2),
                ..PeerOptions::default()
            },
            PeerOptions {
                ebgp_multihop: Some(2),
                ttl_security_hops: Some(1),
                ..PeerOptions::default()
            },
            PeerOptions {
                ttl_security_hops: Some(0),
                ..PeerOptions::default()
            },
            PeerOptions {
                source: Some("2001:db8::1".parse().unwrap()),
                ..PeerOptions::default()
            },
            PeerOptions {
                local_asn: Some(0),
                ..PeerOptions::default()
            },
        ] {
            assert!(peer(bad.clone()).check().is_err(), "{bad:?}");
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
        // No configured peer: the BGPPeers may bring them.
        assert!(SpeakerConfig::new(64512, id, vec![], 3, vec![], d).is_ok());
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
        let mut communities = vec![0xfc00_0001; MAX_COMMUNITIES + MAX_POOL_COMMUNITIES];
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
