//! BFD for the BGP sessions (RFC 5880 asynchronous mode, single hop per RFC 5881, IPv4 and
//! IPv6): control packets to UDP 3784 of each peer from a source port in 49152-65535 with TTL
//! (hop limit) 255. The router notices a silent node within detect-multiplier x interval (300 ms
//! by default) instead of the BGP hold time, and this side closes the BGP session when the
//! peer's BFD fails.
//!
//! What a received datagram must pass, all of it (anything else is dropped and counted in
//! [`Drops`], never logged one by one; a summary is logged at most once a minute):
//! - it arrived on a socket bound to UDP 3784 of the local address the node uses towards a
//!   peer (not 0.0.0.0, unless the route to a peer was unknown at start);
//! - its TTL / hop limit, read per datagram (IP_RECVTTL / IPV6_RECVHOPLIMIT), is 255: RFC 5881
//!   section 5 (GTSM). IP_MINTTL does not do this: Linux applies it to TCP only;
//! - it is a valid control packet (RFC 5880 section 6.8.6);
//! - its source address is a configured peer AND its "your discriminator" is that session's
//!   (32 random bits, nonzero), or 0 while the packet says Down/AdminDown (the RFC's start).
//!
//! A peer's AdminDown takes the BFD session Down but is no path failure (RFC 5882 section 3.2):
//! the BGP session stays, held by its own hold timer.
//!
//! Kept small: no authentication, no echo function, no demand mode; the intervals are the
//! configured ones from the start (the poll sequence is answered, never started).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd as _, FromRawFd as _, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use log::{info, warn};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

pub const BFD_PORT: u16 = 3784;
const PACKET_LEN: usize = 24;
/// RFC 5881 section 5: single-hop packets are sent and must arrive with TTL / hop limit 255.
const REQUIRED_TTL: u8 = 255;
/// How often a summary of dropped packets may be logged.
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// Session states (RFC 5880 section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    AdminDown = 0,
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }
}

/// A control packet's fields this implementation uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub diag: u8,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    /// Microseconds.
    pub desired_min_tx: u32,
    pub required_min_rx: u32,
}

impl Packet {
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (1 << 5) | (self.diag & 0x1f);
        b[1] = ((self.state as u8) << 6)
            | if self.poll { 0x20 } else { 0 }
            | if self.final_ { 0x10 } else { 0 };
        b[2] = self.detect_mult;
        b[3] = PACKET_LEN as u8;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx.to_be_bytes());
        b
    }

    /// Parses and validates (RFC 5880 section 6.8.6); `None` for anything to discard.
    pub fn decode(b: &[u8]) -> Option<Packet> {
        if b.len() < PACKET_LEN {
            return None;
        }
        let len = usize::from(b[3]);
        let auth = b[1] & 0x04 != 0;
        let multipoint = b[1] & 0x01 != 0;
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let p = Packet {
            diag: b[0] & 0x1f,
            state: State::from_bits(b[1] >> 6),
            poll: b[1] & 0x20 != 0,
            final_: b[1] & 0x10 != 0,
            detect_mult: b[2],
            my_disc: word(4),
            your_disc: word(8),
            desired_min_tx: word(12),
            required_min_rx: word(16),
        };
        let valid = b[0] >> 5 == 1
            && len >= PACKET_LEN
            && len <= b.len()
            && !auth
            && !multipoint
            && p.detect_mult != 0
            && p.my_disc != 0
            && (p.your_disc != 0 || matches!(p.state, State::Down | State::AdminDown));
        valid.then_some(p)
    }
}

/// Timers of every session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BfdConfig {
    pub interval: Duration,
    pub multiplier: u8,
}

/// The flags' defaults (`--bgp-bfd-interval 100 --bgp-bfd-multiplier 3`): a silent peer is
/// noticed in 300 ms.
impl Default for BfdConfig {
    fn default() -> Self {
        BfdConfig {
            interval: Duration::from_millis(100),
            multiplier: 3,
        }
    }
}

/// What a BFD session tells its BGP session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Link {
    /// Not up yet: BGP runs on its own timers.
    #[default]
    Waiting,
    Up,
    /// Was up, then the peer stopped answering or signalled Down: a path failure, BGP closes.
    Failed,
    /// Was up, then the peer went AdminDown: BFD is Down but that is no failure (RFC 5882
    /// section 3.2); BGP keeps its session.
    AdminDown,
}

/// Received datagrams dropped, by reason (shared with whoever reports them).
#[derive(Debug, Default)]
pub struct Drops {
    ttl: AtomicU64,
    malformed: AtomicU64,
    unknown_source: AtomicU64,
    wrong_discriminator: AtomicU64,
}

/// A copy of [`Drops`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounts {
    /// TTL / hop limit below 255 (or not reported): not from a directly connected sender.
    pub ttl: u64,
    /// Not a valid BFD control packet (RFC 5880 section 6.8.6), or truncated.
    pub malformed: u64,
    /// From an address that is not a peer.
    pub unknown_source: u64,
    /// From a peer, but for another discriminator than that session's.
    pub wrong_discriminator: u64,
}

impl Drops {
    pub fn counts(&self) -> DropCounts {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DropCounts {
            ttl: get(&self.ttl),
            malformed: get(&self.malformed),
            unknown_source: get(&self.unknown_source),
            wrong_discriminator: get(&self.wrong_discriminator),
        }
    }
    #[cfg(test)]
    pub(super) fn add_for_test(&self, ttl: u64, malformed: u64, unknown: u64, wrong: u64) {
        self.ttl.fetch_add(ttl, Ordering::Relaxed);
        self.malformed.fetch_add(malformed, Ordering::Relaxed);
        self.unknown_source.fetch_add(unknown, Ordering::Relaxed);
        self.wrong_discriminator.fetch_add(wrong, Ordering::Relaxed);
    }
    fn add(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl DropCounts {
    pub fn total(&self) -> u64 {
        self.ttl
            .saturating_add(self.malformed)
            .saturating_add(self.unknown_source)
            .saturating_add(self.wrong_discriminator)
    }
}

impl fmt::Display for DropCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "TTL below 255 {}, malformed {}, unknown source {}, wrong discriminator {}",
            self.ttl, self.malformed, self.unknown_source, self.wrong_discriminator
        )
    }
}

/// One peer to run BFD with.
pub struct BfdPeer {
    pub addr: IpAddr,
    /// Its BFD port: [`BFD_PORT`] (tests use others).
    pub port: u16,
    pub link: watch::Sender<Link>,
}

struct Session {
    peer: IpAddr,
    port: u16,
    my_disc: u32,
    your_disc: u32,
    state: State,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_mult: u8,
    last_rx: Option<Instant>,
    next_tx: Instant,
    /// Answer a poll with a final at once.
    send_final: bool,
    link: watch::Sender<Link>,
}

impl Session {
    fn new(peer: BfdPeer, my_disc: u32, cfg: &BfdConfig) -> Session {
        Session {
            peer: peer.addr,
            port: peer.port,
            my_disc,
            your_disc: 0,
            state: State::Down,
            remote_min_rx: Duration::ZERO,
            remote_desired_tx: Duration::ZERO,
            remote_mult: cfg.multiplier,
            last_rx: None,
            next_tx: Instant::now(),
            send_final: false,
            link: peer.link,
        }
    }

    fn tx_interval(&self, cfg: &BfdConfig) -> Duration {
        cfg.interval.max(self.remote_min_rx)
    }

    /// When the peer is declared down without a packet (while Init or Up).
    fn detect_deadline(&self, cfg: &BfdConfig) -> Option<Instant> {
        if !matches!(self.state, State::Init | State::Up) {
            return None;
        }
        let each = cfg.interval.max(self.remote_desired_tx);
        self.last_rx
            .map(|t| t + each * u32::from(self.remote_mult.max(1)))
    }

    /// `admin`: the peer went AdminDown (leaving Up then is no failure).
    fn set_state(&mut self, state: State, why: &str, admin: bool) {
        if state == self.state {
            return;
        }
        if state == State::Up || self.state == State::Up {
            info!(
                "BFD peer {}: {:?} -> {state:?} ({why})",
                self.peer, self.state
            );
        }
        let link = if state == State::Up {
            Some(Link::Up)
        } else if self.state == State::Up {
            Some(if admin { Link::AdminDown } else { Link::Failed })
        } else {
            None
        };
        self.state = state;
        if let Some(link) = link {
            self.link
                .send_if_modified(|l| std::mem::replace(l, link) != link);
        }
        // Tell the peer at once.
        self.next_tx = Instant::now();
    }

    fn packet(&mut self, cfg: &BfdConfig, diag: u8) -> Packet {
        let final_ = std::mem::take(&mut self.send_final);
        Packet {
            diag,
            state: self.state,
            poll: false,
            final_,
            detect_mult: cfg.multiplier,
            my_disc: self.my_disc,
            your_disc: self.your_disc,
            desired_min_tx: micros(cfg.interval),
            required_min_rx: micros(cfg.interval),
        }
    }

    /// Reception (RFC 5880 section 6.8.6, from "If bfd.RemoteDiscr" on).
    fn receive(&mut self, p: &Packet) {
        self.your_disc = p.my_disc;
        self.remote_min_rx = Duration::from_micros(u64::from(p.required_min_rx));
        self.remote_desired_tx = Duration::from_micros(u64::from(p.desired_min_tx));
        self.remote_mult = p.detect_mult;
        self.last_rx = Some(Instant::now());
        if p.poll {
            self.send_final = true;
            self.next_tx = Instant::now();
        }
        match (self.state, p.state) {
            (_, State::AdminDown) => {
                if self.state != State::Down {
                    self.set_state(
                        State::Down,
                        "the peer is administratively down: not a failure, BGP stays",
                        true,
                    );
                }
            }
            (State::Down, State::Down) => self.set_state(State::Init, "the peer is down", false),
            (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                self.set_state(State::Up, "the peer answered", false)
            }
            (State::Up, State::Down) => {
                self.set_state(State::Down, "the peer signalled down", false)
            }
            _ => {}
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// 32 random bits from the kernel (getrandom, else /dev/urandom).
fn random_u32() -> io::Result<u32> {
    let mut b = [0u8; 4];
    // SAFETY: getrandom writes at most the 4 bytes of the live buffer passed.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 4 {
        use std::io::Read as _;
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    }
    Ok(u32::from_ne_bytes(b))
}

/// `n` distinct nonzero random discriminators.
fn discriminators(n: usize) -> io::Result<Vec<u32>> {
    let mut out: Vec<u32> = Vec::with_capacity(n);
    for _ in 0..n.saturating_mul(4).saturating_add(16) {
        if out.len() == n {
            break;
        }
        let d = random_u32()?;
        if d != 0 && !out.contains(&d) {
            out.push(d);
        }
    }
    if out.len() < n {
        return Err(io::Error::other("the random source keeps repeating itself"));
    }
    Ok(out)
}

pub(super) fn set_int_opt(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A nonblocking UDP socket bound to `addr` (IPv6 sockets IPv6-only, so that `[::]` and
/// `0.0.0.0` can both be bound).
fn udp_bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let family = match addr {
        SocketAddr::V4(_) => libc::AF_INET,
        SocketAddr::V6(_) => libc::AF_INET6,
    };
    // SAFETY: a plain socket(2) call; the descriptor is owned by `s` right after.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let s = unsafe { std::net::UdpSocket::from_raw_fd(fd) };
    if addr.is_ipv6() {
        set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: bind with a sockaddr of the length given.
    let rc = unsafe { libc::bind(fd, (&raw const storage).cast(), len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    UdpSocket::from_std(s)
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The local address the node sends from towards `peer` (a route lookup; nothing is sent).
pub fn local_addr_towards(peer: IpAddr) -> io::Result<IpAddr> {
    let any: IpAddr = match peer {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = std::net::UdpSocket::bind(SocketAddr::new(any, 0))?;
    s.connect(SocketAddr::new(peer, BFD_PORT))?;
    Ok(s.local_addr()?.ip())
}

/// The receiving sockets (UDP 3784 of each local address) and the sending ones (TTL 255).
pub struct Sockets {
    rx: Vec<UdpSocket>,
    tx4: Option<UdpSocket>,
    tx6: Option<UdpSocket>,
}

impl Sockets {
    /// For the peers' BFD: receives on UDP 3784 of the local address the node uses towards
    /// each peer (the unspecified address of its family when there is no route to it yet).
    /// Bound at once (inside the runtime), so that a taken port 3784 stops the agent with a
    /// clear error instead of leaving BFD silently off.
    pub fn for_peers(peers: &[IpAddr]) -> anyhow::Result<Sockets> {
        Self::for_peers_on(peers, BFD_PORT)
    }

    fn for_peers_on(peers: &[IpAddr], port: u16) -> anyhow::Result<Sockets> {
        let mut locals = BTreeSet::new();
        for peer in peers {
            match local_addr_towards(*peer) {
                Ok(local) => {
                    locals.insert(local);
                }
                Err(e) => {
                    let any: IpAddr = match peer {
                        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
                    };
                    warn!(
                        "BFD peer {peer}: no route to it now ({e}): receiving BFD on {any} port {port} (still only TTL 255 from the peer's address)"
                    );
                    locals.insert(any);
                }
            }
        }
        // An unspecified address covers the family's specific ones (binding both would clash).
        let any4 = locals.contains(&IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let any6 = locals.contains(&IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        locals.retain(|a| a.is_unspecified() || !(if a.is_ipv4() { any4 } else { any6 }));
        let locals: Vec<IpAddr> = locals.into_iter().collect();
        Self::open(&locals, port)
    }

    /// Receives on `port` of each of `locals`; sends from the families they cover.
    pub fn open(locals: &[IpAddr], port: u16) -> anyhow::Result<Sockets> {
        let mut rx = Vec::new();
        for local in locals {
            let at = SocketAddr::new(*local, port);
            let s = udp_bind(at).map_err(|e| {
                anyhow::anyhow!(
                    "BFD: binding UDP {at} (is another BFD daemon running on this node? turn --bgp-bfd off): {e}"
                )
            })?;
            let fd = s.as_raw_fd();
            match local {
                IpAddr::V4(_) => set_int_opt(fd, libc::IPPROTO_IP, libc::IP_RECVTTL, 1),
                IpAddr::V6(_) => set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1),
            }
            .map_err(|e| anyhow::anyhow!("BFD: asking for the TTL of packets to {at}: {e}"))?;
            rx.push(s);
        }
        let tx = |any: IpAddr| -> anyhow::Result<UdpSocket> {
            let mut last = None;
            for port in 49152..=65535u16 {
                match udp_bind(SocketAddr::new(any, port)) {
                    Ok(s) => {
                        let fd = s.as_raw_fd();
                        match any {
                            IpAddr::V4(_) => set_int_opt(fd, libc::IPPROTO_IP, libc::IP_TTL, 255),
                            IpAddr::V6(_) => {
                                set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)
                            }
                        }
                        .map_err(|e| {
                            anyhow::anyhow!("BFD: setting TTL 255 on the sending socket: {e}")
                        })?;
                        return Ok(s);
                    }
                    Err(e) => last = Some(e),
                }
            }
            anyhow::bail!("BFD: no free UDP source port in 49152-65535: {last:?}")
        };
        let tx4 = if locals.iter().any(IpAddr::is_ipv4) {
            Some(tx(Ipv4Addr::UNSPECIFIED.into())?)
        } else {
            None
        };
        let tx6 = if locals.iter().any(IpAddr::is_ipv6) {
            Some(tx(Ipv6Addr::UNSPECIFIED.into())?)
        } else {
            None
        };
        Ok(Sockets { rx, tx4, tx6 })
    }

    /// Where the receiving sockets are bound.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.rx.iter().filter_map(|s| s.local_addr().ok()).collect()
    }

    async fn send(&self, to: SocketAddr, p: &Packet) -> io::Result<()> {
        let tx = match to {
            SocketAddr::V4(_) => self.tx4.as_ref(),
            SocketAddr::V6(_) => self.tx6.as_ref(),
        };
        let tx = tx.ok_or_else(|| io::Error::other("no sending socket of this family"))?;
        tx.send_to(&p.encode(), to).await.map(|_| ())
    }

    /// The next datagram on any receiving socket.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<Datagram> {
        std::future::poll_fn(|cx| {
            for s in &self.rx {
                while let Poll::Ready(ready) = s.poll_recv_ready(cx) {
                    if let Err(e) = ready {
                        return Poll::Ready(Err(e));
                    }
                    let fd = s.as_raw_fd();
                    match s.try_io(Interest::READABLE, || recv_with_ttl(fd, &mut *buf)) {
                        Ok(d) => return Poll::Ready(Ok(d)),
                        // Readiness cleared: the next poll registers for the next datagram.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
            }
            Poll::Pending
        })
        .await
    }
}

/// A received datagram: its source, its TTL / hop limit (when the kernel said), its length.
struct Datagram {
    from: IpAddr,
    ttl: Option<u8>,
    len: usize,
    truncated: bool,
}

/// recvmsg with the TTL (IPv4, IP_RECVTTL) or hop limit (IPv6, IPV6_RECVHOPLIMIT) ancillary
/// data.
fn recv_with_ttl(fd: RawFd, buf: &mut [u8]) -> io::Result<Datagram> {
    // SAFETY: all-zero is valid for these plain C structs.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // u64 for the alignment cmsghdr needs.
    let mut control = [0u64; 16];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&raw mut from).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` refers to a live buffer of the length given with it.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ttl = None;
    // SAFETY: the CMSG_* walk stays within msg_control/msg_controllen as the kernel set them;
    // each TTL / hop limit payload is a c_int (read unaligned to be safe).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            let h = &*c;
            let is_ttl = (h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_TTL)
                || (h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_HOPLIMIT);
            if is_ttl && h.cmsg_len as usize >= libc::CMSG_LEN(4) as usize {
                let v = libc::CMSG_DATA(c).cast::<libc::c_int>().read_unaligned();
                ttl = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    let from = match libc::c_int::from(from.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in for an AF_INET source.
            let sin = unsafe { &*(&raw const from).cast::<libc::sockaddr_in>() };
            IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 for an AF_INET6 source.
            let sin6 = unsafe { &*(&raw const from).cast::<libc::sockaddr_in6>() };
            IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
        }
        other => return Err(io::Error::other(format!("source address family {other}"))),
    };
    Ok(Datagram {
        from,
        ttl,
        len: n as usize,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
    })
}

/// BFD with every peer.
pub struct Bfd {
    cfg: BfdConfig,
    sockets: Sockets,
    sessions: Vec<Session>,
    by_peer: BTreeMap<IpAddr, usize>,
    drops: Arc<Drops>,
}

impl Bfd {
    /// One session per peer (each address once), each with its own random discriminator.
    pub fn new(cfg: BfdConfig, sockets: Sockets, peers: Vec<BfdPeer>) -> anyhow::Result<Bfd> {
        let discs = discriminators(peers.len())
            .map_err(|e| anyhow::anyhow!("BFD: random discriminators: {e}"))?;
        let mut sessions = Vec::new();
        let mut by_peer = BTreeMap::new();
        for (peer, disc) in peers.into_iter().zip(discs) {
            if by_peer.contains_key(&peer.addr) {
                anyhow::bail!("BFD: peer {} is configured twice", peer.addr);
            }
            by_peer.insert(peer.addr, sessions.len());
            sessions.push(Session::new(peer, disc, &cfg));
        }
        Ok(Bfd {
            cfg,
            sockets,
            sessions,
            by_peer,
            drops: Arc::default(),
        })
    }

    /// Counts the drops in `drops` (shared with `/metrics`: [`super::BgpMetrics`]) instead of
    /// counters of its own.
    pub fn counting_drops_in(mut self, drops: Arc<Drops>) -> Self {
        self.drops = drops;
        self
    }

    /// The drop counters (they keep counting while `run` runs).
    pub fn drops(&self) -> Arc<Drops> {
        self.drops.clone()
    }

    /// Checks a datagram (see the module's header) and hands it to its session.
    fn on_datagram(&mut self, d: &Datagram, bytes: &[u8]) {
        if d.ttl != Some(REQUIRED_TTL) {
            return Drops::add(&self.drops.ttl);
        }
        let Some(p) = Packet::decode(bytes).filter(|_| !d.truncated) else {
            return Drops::add(&self.drops.malformed);
        };
        let Some(s) = self
            .by_peer
            .get(&d.from)
            .and_then(|i| self.sessions.get_mut(*i))
        else {
            return Drops::add(&self.drops.unknown_source);
        };
        // Zero only while the packet says Down or AdminDown (Packet::decode checks that).
        if p.your_disc != 0 && p.your_disc != s.my_disc {
            return Drops::add(&self.drops.wrong_discriminator);
        }
        s.receive(&p);
    }

    /// Runs until `stop`; each peer's `link` follows its session.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        info!(
            "BFD: {} peer(s), {:?} x {}, receiving on {}",
            self.sessions.len(),
            self.cfg.interval,
            self.cfg.multiplier,
            self.sockets
                .local_addrs()
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        );
        let cfg = self.cfg;
        let mut buf = [0u8; 128];
        let mut tick: u32 = 0;
        let mut logged = DropCounts::default();
        let mut log_at = Instant::now() + DROP_LOG_EVERY;
        loop {
            let now = Instant::now();
            if now >= log_at {
                let counts = self.drops.counts();
                if counts != logged {
                    warn!(
                        "BFD: dropped {} received packet(s) in the last {DROP_LOG_EVERY:?} ({} since start: {counts})",
                        counts.total().saturating_sub(logged.total()),
                        counts.total()
                    );
                    logged = counts;
                }
                log_at = now + DROP_LOG_EVERY;
            }
            for s in self.sessions.iter_mut() {
                if let Some(deadline) = s.detect_deadline(&cfg)
                    && now >= deadline
                {
                    s.set_state(State::Down, "detection time expired", false);
                }
                if now >= s.next_tx {
                    let diag = if s.state == State::Down && s.last_rx.is_some() {
                        1
                    } else {
                        0
                    };
                    let p = s.packet(&cfg, diag);
                    if let Err(e) = self.sockets.send(SocketAddr::new(s.peer, s.port), &p).await {
                        log::debug!("BFD peer {}: sending: {e}", s.peer);
                    }
                    // 75-100% of the interval (RFC 5880 6.8.7 jitter), from a cheap counter.
                    tick = tick.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    let interval = s.tx_interval(&cfg);
                    let jitter = 75 + (tick >> 16) % 26;
                    s.next_tx = now + interval * jitter / 100;
                }
            }
            let next = self
                .sessions
                .iter()
                .flat_map(|s| [Some(s.next_tx), s.detect_deadline(&cfg)])
                .flatten()
                .chain([log_at])
                .min()
                .unwrap_or(now + Duration::from_secs(1));
            tokio::select! {
                r = self.sockets.recv(&mut buf) => {
                    let Ok(d) = r else { continue };
                    let n = d.len.min(buf.len());
                    self.on_datagram(&d, &buf[..n]);
                }
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.changed() => break,
            }
        }
        // Tell the peers we go down on purpose (AdminDown): they close without waiting.
        for s in self.sessions.iter_mut() {
            s.state = State::AdminDown;
            let p = s.packet(&cfg, 7);
            let _ = self.sockets.send(SocketAddr::new(s.peer, s.port), &p).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_round_trip_and_bad_ones_are_discarded() {
        let p = Packet {
            diag: 0,
            state: State::Up,
            poll: true,
            final_: false,
            detect_mult: 3,
            my_disc: 7,
            your_disc: 9,
            desired_min_tx: 100_000,
            required_min_rx: 100_000,
        };
        let b = p.encode();
        assert_eq!(Packet::decode(&b), Some(p));
        let mut v0 = b;
        v0[0] = 0;
        assert_eq!(Packet::decode(&v0), None);
        let mut no_disc = b;
        no_disc[4..8].fill(0);
        assert_eq!(Packet::decode(&no_disc), None);
        assert_eq!(Packet::decode(&b[..20]), None);
        // Every byte string of the length decodes or not, never panics.
        let mut x: u32 = 1;
        for _ in 0..100_000 {
            let mut r = [0u8; 30];
            for byte in r.iter_mut() {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *byte = (x >> 16) as u8;
            }
            let _ = Packet::decode(&r[..(x as usize % 31)]);
        }
    }

    fn test_session() -> (Session, watch::Receiver<Link>) {
        let (link, rx) = watch::channel(Link::Waiting);
        let cfg = BfdConfig {
            interval: Duration::from_millis(100),
            multiplier: 3,
        };
        let peer = BfdPeer {
            addr: Ipv4Addr::new(192, 0, 2, 1).into(),
            port: BFD_PORT,
            link,
        };
        (Session::new(peer, 1, &cfg), rx)
    }

    fn from_peer(state: State) -> Packet {
        Packet {
            diag: 0,
            state,
            poll: false,
            final_: false,
            detect_mult: 3,
            my_disc: 5,
            your_disc: 1,
            desired_min_tx: 100_000,
            required_min_rx: 100_000,
        }
    }

    #[test]
    fn three_way_handshake_and_down() {
        let (mut s, rx) = test_session();
        s.receive(&from_peer(State::Down));
        assert_eq!(s.state, State::Init);
        assert_eq!(*rx.borrow(), Link::Waiting);
        s.receive(&from_peer(State::Up));
        assert_eq!(s.state, State::Up);
        assert_eq!(*rx.borrow(), Link::Up);
        s.receive(&from_peer(State::Down));
        assert_eq!(s.state, State::Down);
        assert_eq!(*rx.borrow(), Link::Failed);
    }

    /// RFC 5882 section 3.2: AdminDown from the peer is Down, never a failure.
    #[test]
    fn admin_down_is_no_failure() {
        let (mut s, rx) = test_session();
        s.receive(&from_peer(State::Down));
        s.receive(&from_peer(State::Up));
        assert_eq!(*rx.borrow(), Link::Up);
        s.receive(&from_peer(State::AdminDown));
        assert_eq!(s.state, State::Down);
        assert_eq!(*rx.borrow(), Link::AdminDown);
        // It comes back, then really fails: that is a failure.
        s.receive(&from_peer(State::Down));
        s.receive(&from_peer(State::Up));
        assert_eq!(*rx.borrow(), Link::Up);
        s.set_state(State::Down, "detection time expired", false);
        assert_eq!(*rx.borrow(), Link::Failed);
    }

    #[test]
    fn discriminators_are_random_nonzero_and_distinct() {
        let a = discriminators(16).unwrap();
        let b = discriminators(16).unwrap();
        for d in a.iter().chain(&b) {
            assert_ne!(*d, 0);
        }
        let all: BTreeSet<u32> = a.iter().chain(&b).copied().collect();
        assert_eq!(all.len(), 32);
        // 32 random bits each: no common 24-bit prefix (a pid ^ clock seed gave them one), and
        // the low byte is not the session's index.
        let prefixes: BTreeSet<u32> = a.iter().map(|d| d >> 8).collect();
        assert!(prefixes.len() > 1, "{a:x?}");
        assert!(
            a.iter().enumerate().any(|(i, d)| d & 0xff != i as u32 + 1),
            "{a:x?}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn receives_only_on_the_local_address_towards_the_peers() {
        let s = Sockets::for_peers_on(
            &[
                Ipv4Addr::new(127, 0, 0, 2).into(),
                Ipv4Addr::new(127, 0, 0, 3).into(),
            ],
            0,
        )
        .unwrap();
        let at = s.local_addrs();
        assert_eq!(at.len(), 1, "{at:?}");
        assert!(
            at[0].ip().is_loopback() && !at[0].ip().is_unspecified(),
            "{at:?}"
        );
        assert!(s.tx4.is_some() && s.tx6.is_none());
    }

    /// A stand-in for the router: real UDP sockets on loopback.
    struct Lab {
        /// Where the BFD under test receives.
        bfd_at: SocketAddr,
        /// The router's socket (its address is the peer's; TTL 255).
        router: UdpSocket,
        link: watch::Receiver<Link>,
        drops: Arc<Drops>,
        my_disc: u32,
        router_disc: u32,
        _stop: watch::Sender<bool>,
    }

    fn set_ttl(s: &UdpSocket, ttl: i32) {
        let fd = s.as_raw_fd();
        match s.local_addr().unwrap() {
            SocketAddr::V4(_) => set_int_opt(fd, libc::IPPROTO_IP, libc::IP_TTL, ttl),
            SocketAddr::V6(_) => set_int_opt(fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, ttl),
        }
        .unwrap();
    }

    impl Lab {
        /// BFD on `local` with one peer at `peer`, brought Up by the stand-in router.
        async fn up(local: IpAddr, peer: IpAddr) -> Lab {
            let sockets = Sockets::open(&[local], 0).unwrap();
            let bfd_at = sockets.local_addrs()[0];
            let router = udp_bind(SocketAddr::new(peer, 0)).unwrap();
            set_ttl(&router, 255);
            let (link_tx, link) = watch::channel(Link::Waiting);
            let cfg = BfdConfig {
                interval: Duration::from_millis(1000),
                multiplier: 3,
            };
            let bfd = Bfd::new(
                cfg,
                sockets,
                vec![BfdPeer {
                    addr: peer,
                    port: router.local_addr().unwrap().port(),
                    link: link_tx,
                }],
            )
            .unwrap();
            let drops = bfd.drops();
            let (stop, stop_rx) = watch::channel(false);
            tokio::spawn(bfd.run(stop_rx));
            let mut lab = Lab {
                bfd_at,
                router,
                link,
                drops,
                my_disc: 0,
                router_disc: 0x5eed_0001,
                _stop: stop,
            };
            let mut buf = [0u8; 64];
            let (n, _) =
                tokio::time::timeout(Duration::from_secs(3), lab.router.recv_from(&mut buf))
                    .await
                    .expect("a BFD packet")
                    .unwrap();
            let first = Packet::decode(&buf[..n]).unwrap();
            assert_eq!(first.state, State::Down);
            lab.my_disc = first.my_disc;
            lab.send_from_router(State::Down).await;
            lab.send_from_router(State::Up).await;
            lab.wait_link(Link::Up).await;
            lab
        }

        fn packet(&self, state: State) -> Packet {
            Packet {
                diag: if state == State::AdminDown { 7 } else { 0 },
                state,
                poll: false,
                final_: false,
                detect_mult: 3,
                my_disc: self.router_disc,
                your_disc: self.my_disc,
                desired_min_tx: 1_000_000,
                required_min_rx: 1_000_000,
            }
        }

        async fn send_from_router(&self, state: State) {
            let p = self.packet(state).encode();
            self.router.send_to(&p, self.bfd_at).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        async fn wait_link(&mut self, want: Link) {
            let r =
                tokio::time::timeout(Duration::from_secs(2), self.link.wait_for(|l| *l == want))
                    .await
                    .is_ok();
            assert!(r, "link {:?}, wanted {want:?}", *self.link.borrow());
        }

        /// Sends `p` from `from` with `ttl`, then gives the BFD task time to act on it.
        async fn spoof(&self, from: IpAddr, ttl: i32, p: Packet) {
            let s = udp_bind(SocketAddr::new(from, 0)).unwrap();
            set_ttl(&s, ttl);
            s.send_to(&p.encode(), self.bfd_at).await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A forged AdminDown / Down from the peer's own address, with the right discriminators,
    /// but TTL 64 (not from the link): dropped and counted; the session stays Up. Then the
    /// real router's Down (TTL 255) is still heard.
    #[tokio::test(flavor = "current_thread")]
    async fn spoofed_packets_with_ttl_below_255_are_dropped() {
        let peer: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let mut lab = Lab::up(Ipv4Addr::LOCALHOST.into(), peer).await;
        for (i, state) in [State::AdminDown, State::Down].into_iter().enumerate() {
            lab.spoof(peer, 64, lab.packet(state)).await;
            assert_eq!(*lab.link.borrow(), Link::Up, "after a spoofed {state:?}");
            assert_eq!(lab.drops.counts().ttl, i as u64 + 1);
        }
        lab.spoof(peer, 254, lab.packet(State::Down)).await;
        assert_eq!(*lab.link.borrow(), Link::Up);
        assert_eq!(lab.drops.counts().ttl, 3);
        lab.send_from_router(State::Down).await;
        lab.wait_link(Link::Failed).await;
    }

    /// TTL 255 but from another address (discriminators right), or from the peer's address
    /// with another discriminator: dropped.
    #[tokio::test(flavor = "current_thread")]
    async fn packets_must_match_source_and_discriminator() {
        let peer: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let lab = Lab::up(Ipv4Addr::LOCALHOST.into(), peer).await;
        let other: IpAddr = Ipv4Addr::new(127, 0, 0, 3).into();
        lab.spoof(other, 255, lab.packet(State::AdminDown)).await;
        lab.spoof(other, 255, lab.packet(State::Down)).await;
        assert_eq!(*lab.link.borrow(), Link::Up);
        assert_eq!(lab.drops.counts().unknown_source, 2);
        let mut wrong = lab.packet(State::Down);
        wrong.your_disc ^= 1;
        lab.spoof(peer, 255, wrong).await;
        assert_eq!(*lab.link.borrow(), Link::Up);
        assert_eq!(lab.drops.counts().wrong_discriminator, 1);
        assert_eq!(lab.drops.counts().ttl, 0);
    }

    /// The peer's AdminDown (real, TTL 255) is no failure: Link::AdminDown, not Failed.
    #[tokio::test(flavor = "current_thread")]
    async fn peer_admin_down_is_not_a_failure() {
        let peer: IpAddr = Ipv4Addr::new(127, 0, 0, 2).into();
        let mut lab = Lab::up(Ipv4Addr::LOCALHOST.into(), peer).await;
        lab.send_from_router(State::AdminDown).await;
        lab.wait_link(Link::AdminDown).await;
    }

    /// IPv6: hop limit 64 dropped, 255 heard.
    #[tokio::test(flavor = "current_thread")]
    async fn ipv6_hop_limit_below_255_is_dropped() {
        if udp_bind(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 0)).is_err() {
            eprintln!("SKIPPED: no IPv6 loopback here");
            return;
        }
        let peer: IpAddr = Ipv6Addr::LOCALHOST.into();
        let mut lab = Lab::up(Ipv6Addr::LOCALHOST.into(), peer).await;
        lab.spoof(peer, 64, lab.packet(State::AdminDown)).await;
        assert_eq!(*lab.link.borrow(), Link::Up);
        assert_eq!(lab.drops.counts().ttl, 1);
        lab.send_from_router(State::Down).await;
        lab.wait_link(Link::Failed).await;
    }
}
