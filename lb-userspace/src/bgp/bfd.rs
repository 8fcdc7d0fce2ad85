//! BFD for the BGP sessions (RFC 5880 asynchronous mode, single hop over IPv4 per RFC 5881):
//! control packets to UDP 3784 of each peer from a source port in 49152-65535 with TTL 255,
//! received on UDP 3784 with IP_MINTTL 255 (only directly connected senders). The router
//! notices a silent node within detect-multiplier x interval (300 ms by default) instead of the
//! BGP hold time, and this side closes the BGP session when the peer's BFD goes down.
//!
//! Kept small: no authentication, no echo function, no demand mode; the intervals are the
//! configured ones from the start (the poll sequence is answered, never started).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use log::{info, warn};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::Instant;

pub const BFD_PORT: u16 = 3784;
const PACKET_LEN: usize = 24;

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
#[derive(Clone, Copy, Debug)]
pub struct BfdConfig {
    pub interval: Duration,
    pub multiplier: u8,
}

struct Session {
    peer: Ipv4Addr,
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
    up: watch::Sender<bool>,
}

impl Session {
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

    fn set_state(&mut self, state: State, why: &str) {
        if state == self.state {
            return;
        }
        if state == State::Up || self.state == State::Up {
            info!(
                "BFD peer {}: {:?} -> {state:?} ({why})",
                self.peer, self.state
            );
        }
        self.state = state;
        self.up.send_if_modified(|up| {
            let new = state == State::Up;
            std::mem::replace(up, new) != new
        });
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
                    self.set_state(State::Down, "the peer is administratively down");
                }
            }
            (State::Down, State::Down) => self.set_state(State::Init, "the peer is down"),
            (State::Down, State::Init) | (State::Init, State::Init | State::Up) => {
                self.set_state(State::Up, "the peer answered")
            }
            (State::Up, State::Down) => self.set_state(State::Down, "the peer signalled down"),
            _ => {}
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// A socket option on a tokio socket; errors are reported, never fatal here.
fn set_int_opt(
    sock: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: setsockopt with a pointer to a live c_int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    rc == 0
}

/// The sockets: one bound to UDP 3784 (receive), one to a port in 49152-65535 (send, TTL 255).
/// Bound at once (inside the runtime), so that a taken port 3784 stops the agent with a clear
/// error instead of leaving BFD silently off.
pub fn sockets() -> anyhow::Result<(UdpSocket, UdpSocket)> {
    let bind = |port: u16| -> std::io::Result<UdpSocket> {
        let s = std::net::UdpSocket::bind(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port))?;
        s.set_nonblocking(true)?;
        UdpSocket::from_std(s)
    };
    let rx = bind(BFD_PORT).map_err(|e| {
        anyhow::anyhow!(
            "BFD: binding UDP port {BFD_PORT} (is another BFD daemon running on this node? turn --bgp-bfd off): {e}"
        )
    })?;
    if !set_int_opt(&rx, libc::IPPROTO_IP, libc::IP_MINTTL, 255) {
        warn!("BFD: IP_MINTTL 255 not set: packets from beyond one hop are not filtered");
    }
    let mut last = None;
    for port in 49152..=65535u16 {
        match bind(port) {
            Ok(tx) => {
                if !set_int_opt(&tx, libc::IPPROTO_IP, libc::IP_TTL, 255) {
                    anyhow::bail!("BFD: setting TTL 255 on the sending socket failed");
                }
                return Ok((rx, tx));
            }
            Err(e) => last = Some(e),
        }
    }
    anyhow::bail!("BFD: no free UDP source port in 49152-65535: {last:?}")
}

/// Runs BFD with every peer until `stop`; `up[i]` follows peer i's session.
pub async fn run(
    rx: UdpSocket,
    tx: UdpSocket,
    cfg: BfdConfig,
    peers: Vec<(Ipv4Addr, watch::Sender<bool>)>,
    mut stop: watch::Receiver<bool>,
) {
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    let mut sessions: Vec<Session> = peers
        .into_iter()
        .enumerate()
        .map(|(i, (peer, up))| Session {
            peer,
            // Non-zero and distinct per session.
            my_disc: ((seed & 0x00ff_ffff) << 8) | ((i as u32 + 1) & 0xff),
            your_disc: 0,
            state: State::Down,
            remote_min_rx: Duration::ZERO,
            remote_desired_tx: Duration::ZERO,
            remote_mult: cfg.multiplier,
            last_rx: None,
            next_tx: Instant::now(),
            send_final: false,
            up,
        })
        .collect();
    let by_peer: BTreeMap<Ipv4Addr, usize> = sessions
        .iter()
        .enumerate()
        .map(|(i, s)| (s.peer, i))
        .collect();
    info!(
        "BFD: {} peer(s), {:?} x {}",
        sessions.len(),
        cfg.interval,
        cfg.multiplier
    );
    let mut buf = [0u8; 128];
    let mut tick: u32 = 0;
    loop {
        let now = Instant::now();
        for s in sessions.iter_mut() {
            if let Some(deadline) = s.detect_deadline(&cfg)
                && now >= deadline
            {
                s.set_state(State::Down, "detection time expired");
            }
            if now >= s.next_tx {
                let diag = if s.state == State::Down && s.last_rx.is_some() {
                    1
                } else {
                    0
                };
                let p = s.packet(&cfg, diag);
                if let Err(e) = tx
                    .send_to(&p.encode(), SocketAddr::new(IpAddr::V4(s.peer), BFD_PORT))
                    .await
                {
                    log::debug!("BFD peer {}: sending: {e}", s.peer);
                }
                // 75-100% of the interval (RFC 5880 6.8.7 jitter), from a cheap counter.
                tick = tick.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                let interval = s.tx_interval(&cfg);
                let jitter = 75 + (tick >> 16) % 26;
                s.next_tx = now + interval * jitter / 100;
            }
        }
        let next = sessions
            .iter()
            .flat_map(|s| [Some(s.next_tx), s.detect_deadline(&cfg)])
            .flatten()
            .min()
            .unwrap_or(now + Duration::from_secs(1));
        tokio::select! {
            r = rx.recv_from(&mut buf) => {
                let Ok((n, from)) = r else { continue };
                let Some(p) = Packet::decode(&buf[..n]) else { continue };
                let IpAddr::V4(src) = from.ip() else { continue };
                let index = if p.your_disc != 0 {
                    sessions.iter().position(|s| s.my_disc == p.your_disc)
                } else {
                    by_peer.get(&src).copied()
                };
                if let Some(s) = index.and_then(|i| sessions.get_mut(i)) {
                    s.receive(&p);
                }
            }
            _ = tokio::time::sleep_until(next) => {}
            _ = stop.changed() => break,
        }
    }
    // Tell the peers we go down on purpose (AdminDown): they close without waiting.
    for s in sessions.iter_mut() {
        s.state = State::AdminDown;
        let p = s.packet(&cfg, 7);
        let _ = tx
            .send_to(&p.encode(), SocketAddr::new(IpAddr::V4(s.peer), BFD_PORT))
            .await;
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

    #[test]
    fn three_way_handshake_and_down() {
        let (up, rx) = watch::channel(false);
        let mut s = Session {
            peer: Ipv4Addr::new(192, 0, 2, 1),
            my_disc: 1,
            your_disc: 0,
            state: State::Down,
            remote_min_rx: Duration::ZERO,
            remote_desired_tx: Duration::ZERO,
            remote_mult: 3,
            last_rx: None,
            next_tx: Instant::now(),
            send_final: false,
            up,
        };
        let from = |state| Packet {
            diag: 0,
            state,
            poll: false,
            final_: false,
            detect_mult: 3,
            my_disc: 5,
            your_disc: 1,
            desired_min_tx: 100_000,
            required_min_rx: 100_000,
        };
        s.receive(&from(State::Down));
        assert_eq!(s.state, State::Init);
        s.receive(&from(State::Up));
        assert_eq!(s.state, State::Up);
        assert!(*rx.borrow());
        s.receive(&from(State::Down));
        assert_eq!(s.state, State::Down);
        assert!(!*rx.borrow());
    }
}
