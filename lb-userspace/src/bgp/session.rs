//! One BGP session to one peer: an outgoing TCP connection (this speaker never listens, so it
//! never binds port 179), the RFC 4271 states Connect -> OpenSent -> OpenConfirm -> Established
//! with the hold and keepalive timers, and the Adj-RIB-Out kept equal to the routes the speaker
//! publishes. After any failure it waits and connects again; the routes are announced anew on
//! every new session, so nothing stale survives a restart (the peer dropped them with the old
//! session).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::{IpNet, Ipv4Net};
use log::{debug, info, warn};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::watch;
use tokio::time::{Instant, sleep_until, timeout};

use super::bfd::Link;
use super::metrics::Reason;
use super::socket;
use super::wire::{
    self, AFI_IPV4, AFI_IPV6, AS_SEQUENCE, AS_TRANS, Attribute, Capability, Context, Message,
    Notification, Open, SAFI_UNICAST, Segment, Update, code,
};
use super::{Peer, RouteAttrs, Routes, SpeakerConfig};

/// Delay before connecting again after a failed or closed session (doubling up to the max).
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long an OPEN may take to arrive (RFC 4271's large hold time before OPEN is 4 min; a
/// router that answers at all answers in well under this).
const OPEN_WAIT: Duration = Duration::from_secs(30);
/// The deadline of one write when the hold time is 0 (no keepalives).
const WRITE_DEADLINE_NO_HOLD: Duration = Duration::from_secs(30);

/// How long one write may wait for the peer to take it: less than the hold time, so that a
/// peer that stopped reading (zero TCP window) cannot freeze the session loop past it.
fn write_deadline(hold_secs: u16) -> Duration {
    if hold_secs == 0 {
        return WRITE_DEADLINE_NO_HOLD;
    }
    (Duration::from_secs(u64::from(hold_secs)) / 2).max(Duration::from_secs(1))
}

/// What the speaker tells a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Keep the peer's Adj-RIB-Out equal to these routes.
    Run(Routes),
    /// Withdraw whatever is announced, then close with Cease / administrative shutdown.
    Close,
}

/// What a session tells the speaker (for /readyz-style reporting and the drain's wait).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub established: bool,
    /// When the session last became established (`None` while it is not).
    pub up_since: Option<Instant>,
    /// Sessions that failed (ended other than by `Close`) since the speaker started.
    pub failures: u64,
    /// Why the last one failed, in words and as a `/metrics` label.
    pub last_error: Option<String>,
    pub last_reason: Option<Reason>,
    /// The routes the peer has been sent (equal to the last `Run` once synced).
    pub sent: Option<Routes>,
    /// The session has closed for good (after `Close`).
    pub closed: bool,
}

/// Why a session ended.
enum End {
    /// `Close` was asked for and done.
    Closed,
    /// Anything else: retried.
    Failed(Reason, String),
}

pub async fn run(
    config: SpeakerConfig,
    peer: Peer,
    mut commands: watch::Receiver<Command>,
    status: watch::Sender<Status>,
    mut bfd: Option<watch::Receiver<Link>>,
) {
    let mut retry = RETRY_FIRST;
    let mut failing = false;
    loop {
        if matches!(*commands.borrow(), Command::Close) {
            break;
        }
        let started = Instant::now();
        match session(&config, &peer, &mut commands, &status, &mut bfd).await {
            End::Closed => break,
            End::Failed(reason, why) => {
                let was_up = status.borrow().established;
                status.send_modify(|s| {
                    s.established = false;
                    s.up_since = None;
                    s.sent = None;
                    s.failures += 1;
                    s.last_error = Some(why.clone());
                    s.last_reason = Some(reason);
                });
                // Once per outage at warn (the session was up, or this is the first attempt);
                // the retries of a peer that stays unreachable at debug.
                if was_up || !failing {
                    warn!(
                        "BGP peer {}: {why}; connecting again in {retry:?} (retries logged at debug)",
                        peer.addr
                    );
                } else {
                    debug!(
                        "BGP peer {}: {why}; connecting again in {retry:?}",
                        peer.addr
                    );
                }
                failing = true;
            }
        }
        // A session that lasted a while starts the backoff afresh.
        if started.elapsed() > RETRY_MAX * 3 {
            retry = RETRY_FIRST;
        }
        tokio::select! {
            _ = tokio::time::sleep(retry) => {}
            _ = wait_close(&mut commands) => break,
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
    status.send_modify(|s| {
        s.established = false;
        s.up_since = None;
        s.closed = true;
    });
}

async fn wait_close(commands: &mut watch::Receiver<Command>) {
    loop {
        if matches!(*commands.borrow_and_update(), Command::Close) {
            return;
        }
        if commands.changed().await.is_err() {
            return;
        }
    }
}

/// Reads whole messages off the connection.
struct Reader {
    half: OwnedReadHalf,
    ctx: Context,
}

enum ReadError {
    Io(String),
    /// Malformed: answered with the NOTIFICATION it calls for.
    Bad(wire::WireError),
}

impl ReadError {
    fn failed(&self) -> End {
        match self {
            ReadError::Io(e) => {
                End::Failed(Reason::ConnectionLost, format!("connection lost: {e}"))
            }
            ReadError::Bad(e) => End::Failed(
                Reason::Malformed,
                format!("malformed message from the peer: {e}"),
            ),
        }
    }
}

impl Reader {
    async fn next(&mut self) -> Result<Message, ReadError> {
        let mut header = [0u8; wire::HEADER_LEN];
        self.half
            .read_exact(&mut header)
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?;
        let len = wire::message_len(&header).map_err(ReadError::Bad)?;
        let mut msg = header.to_vec();
        msg.resize(len, 0);
        self.half
            .read_exact(&mut msg[wire::HEADER_LEN..])
            .await
            .map_err(|e| ReadError::Io(e.to_string()))?;
        wire::decode(&msg, self.ctx).map_err(ReadError::Bad)
    }
}

struct Writer {
    half: OwnedWriteHalf,
    ctx: Context,
    /// Each write's deadline ([`write_deadline`]).
    deadline: Duration,
}

impl Writer {
    async fn send(&mut self, msg: &Message) -> Result<(), String> {
        match timeout(
            self.deadline,
            self.half.write_all(&wire::encode(msg, self.ctx)),
        )
        .await
        {
            Ok(r) => r.map_err(|e| format!("sending: {e}")),
            Err(_) => {
                // Reset (RST) instead of leaving the unsent bytes to a closing socket.
                let _ = self.half.as_ref().set_zero_linger();
                Err(format!(
                    "sending: a write did not complete in {:?} (the peer stopped reading: TCP window closed?); resetting the session",
                    self.deadline
                ))
            }
        }
    }

    /// Best effort: the session ends after it either way.
    async fn notify(&mut self, n: Notification) {
        let _ = timeout(Duration::from_secs(1), self.send(&Message::Notification(n))).await;
        let _ = self.half.shutdown().await;
    }
}

async fn session(
    config: &SpeakerConfig,
    peer: &Peer,
    commands: &mut watch::Receiver<Command>,
    status: &watch::Sender<Status>,
    bfd: &mut Option<watch::Receiver<Link>>,
) -> End {
    let stream = match socket::connect(peer, config.connect_timeout).await {
        Ok(s) => s,
        Err(e) => return End::Failed(e.reason, e.text),
    };
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(a) => a.ip(),
        Err(e) => {
            return End::Failed(
                Reason::ConnectionLost,
                format!("local address of the connection: {e}"),
            );
        }
    };
    let (rd, wr) = stream.into_split();
    // Until the OPENs are exchanged: 2-octet AS numbers (only OPEN and NOTIFICATION pass).
    let ctx = Context {
        four_octet_as: false,
    };
    let mut reader = Reader { half: rd, ctx };
    let mut writer = Writer {
        half: wr,
        ctx,
        deadline: write_deadline(peer.hold_time_secs(config)),
    };
    // What BFD did between sessions is no news to this one.
    if let Some(rx) = bfd.as_mut() {
        rx.borrow_and_update();
    }
    debug!("BGP peer {}: connected from {local}", peer.addr);

    let local_asn = peer.local_asn(config);
    let my_as = u16::try_from(local_asn).unwrap_or(AS_TRANS);
    let open = Open {
        version: 4,
        my_as,
        hold_time: peer.hold_time_secs(config),
        router_id: config.router_id,
        capabilities: vec![
            Capability::Multiprotocol {
                afi: AFI_IPV4,
                safi: SAFI_UNICAST,
            },
            Capability::Multiprotocol {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
            },
            Capability::RouteRefresh,
            Capability::FourOctetAs(local_asn),
        ],
    };
    if let Err(e) = writer.send(&Message::Open(open)).await {
        return End::Failed(Reason::SendFailed, e);
    }
    // OpenSent: the peer's OPEN.
    let theirs = match timeout(OPEN_WAIT, reader.next()).await {
        Err(_) => {
            writer
                .notify(Notification {
                    code: code::HOLD_TIMER,
                    subcode: 0,
                    data: Vec::new(),
                })
                .await;
            return End::Failed(Reason::NoOpen, format!("no OPEN in {OPEN_WAIT:?}"));
        }
        Ok(Err(e)) => {
            if let ReadError::Bad(bad) = &e {
                writer.notify(bad.notification()).await;
            }
            return e.failed();
        }
        Ok(Ok(Message::Open(o))) => o,
        Ok(Ok(Message::Notification(n))) => {
            return End::Failed(
                Reason::PeerRefused,
                format!("the peer refused the session: {n}"),
            );
        }
        Ok(Ok(other)) => {
            writer
                .notify(Notification {
                    code: code::FSM,
                    subcode: 1,
                    data: Vec::new(),
                })
                .await;
            return End::Failed(Reason::Unexpected, format!("expected OPEN, got {other:?}"));
        }
    };
    if let Err(n) = check_open(&theirs, peer, config) {
        let why = format!("refusing the peer's OPEN: {n}");
        writer.notify(n).await;
        return End::Failed(Reason::OpenRefused, why);
    }
    let hold = theirs.hold_time.min(peer.hold_time_secs(config));
    let ctx = Context {
        four_octet_as: theirs.four_octet_as(),
    };
    reader.ctx = ctx;
    writer.ctx = ctx;
    writer.deadline = write_deadline(hold);
    let hold_time = (hold > 0).then(|| Duration::from_secs(u64::from(hold)));
    let keepalive_every = hold_time.map(|h| h / 3);
    if let Err(e) = writer.send(&Message::Keepalive).await {
        return End::Failed(Reason::SendFailed, e);
    }

    // OpenConfirm -> Established on the peer's KEEPALIVE; messages are read by one task so that
    // a read is never cancelled half way (select! on a read future would lose bytes).
    let (msg_tx, mut msgs) = tokio::sync::mpsc::channel::<Result<Message, ReadError>>(16);
    let reading = tokio::spawn(async move {
        loop {
            let m = reader.next().await;
            let failed = m.is_err();
            if msg_tx.send(m).await.is_err() || failed {
                break;
            }
        }
    });
    let _stop_reading = AbortOnDrop(reading);
    let mut established = false;
    let mut rib_out: Routes = Routes::new();
    let mut hold_deadline = hold_time.map(|h| Instant::now() + h);
    let mut keepalive_at = keepalive_every.map(|k| Instant::now() + k);
    let family_ok = |p: &IpNet| {
        matches!(
            (p, local),
            (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_))
        )
    };
    loop {
        let far = Instant::now() + Duration::from_secs(3600);
        tokio::select! {
            m = msgs.recv() => {
                let Some(m) = m else { return End::Failed(Reason::ConnectionLost, "connection lost".into()) };
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        if let ReadError::Bad(bad) = &e {
                            writer.notify(bad.notification()).await;
                        }
                        return e.failed();
                    }
                };
                hold_deadline = hold_time.map(|h| Instant::now() + h);
                match m {
                    Message::Keepalive if !established => {
                        established = true;
                        status.send_modify(|s| {
                            s.established = true;
                            s.up_since = Some(Instant::now());
                        });
                        info!(
                            "BGP peer {} (AS {}, id {}): established from {local}, hold time {hold}s",
                            peer.addr, theirs.asn(), theirs.router_id
                        );
                        let wanted = current(commands).filtered(family_ok);
                        if let Err(e) = sync(&mut writer, config, peer, local, &mut rib_out, &wanted, true).await {
                            return End::Failed(Reason::SendFailed, e);
                        }
                        status.send_modify(|s| s.sent = Some(wanted));
                    }
                    Message::Keepalive | Message::Update(_) if established => {}
                    Message::RouteRefresh { .. } if established => {
                        debug!("BGP peer {}: route refresh asked", peer.addr);
                        let all = rib_out.clone();
                        rib_out.clear();
                        if let Err(e) = sync(&mut writer, config, peer, local, &mut rib_out, &all, false).await {
                            return End::Failed(Reason::SendFailed, e);
                        }
                    }
                    Message::Notification(n) => {
                        return End::Failed(Reason::PeerClosed, format!("the peer closed the session: {n}"));
                    }
                    other => {
                        writer.notify(Notification { code: code::FSM, subcode: if established { 3 } else { 2 }, data: Vec::new() }).await;
                        return End::Failed(Reason::Unexpected, format!("unexpected {other:?}"));
                    }
                }
            }
            _ = bfd_down(bfd) => {
                let _ = writer.half.shutdown().await;
                return End::Failed(Reason::Bfd, "BFD: the peer stopped answering".into());
            }
            _ = sleep_until(hold_deadline.unwrap_or(far)), if hold_deadline.is_some() => {
                writer.notify(Notification { code: code::HOLD_TIMER, subcode: 0, data: Vec::new() }).await;
                return End::Failed(Reason::HoldTimer, format!("hold timer expired ({hold}s without a message)"));
            }
            _ = sleep_until(keepalive_at.unwrap_or(far)), if keepalive_at.is_some() => {
                if let Err(e) = writer.send(&Message::Keepalive).await {
                    return End::Failed(Reason::SendFailed, e);
                }
                keepalive_at = keepalive_every.map(|k| Instant::now() + k);
            }
            changed = commands.changed() => {
                if changed.is_err() {
                    return End::Closed;
                }
                let command = commands.borrow_and_update().clone();
                match command {
                    Command::Run(routes) if established => {
                        let wanted = routes.filtered(family_ok);
                        if let Err(e) = sync(&mut writer, config, peer, local, &mut rib_out, &wanted, false).await {
                            return End::Failed(Reason::SendFailed, e);
                        }
                        status.send_modify(|s| s.sent = Some(wanted));
                    }
                    Command::Run(_) => {}
                    Command::Close => {
                        if established && !rib_out.is_empty() {
                            let _ = sync(&mut writer, config, peer, local, &mut rib_out, &Routes::new(), false).await;
                        }
                        writer.notify(Notification { code: code::CEASE, subcode: code::CEASE_ADMIN_SHUTDOWN, data: Vec::new() }).await;
                        info!("BGP peer {}: session closed (administrative shutdown)", peer.addr);
                        return End::Closed;
                    }
                }
            }
        }
    }
}

/// Returns when BFD fails after having been up (never without BFD). The peer's AdminDown is
/// no failure (RFC 5882 section 3.2): the session then runs on its hold timer.
async fn bfd_down(bfd: &mut Option<watch::Receiver<Link>>) {
    let Some(rx) = bfd else {
        return std::future::pending().await;
    };
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        if *rx.borrow_and_update() == Link::Failed {
            return;
        }
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn current(commands: &watch::Receiver<Command>) -> Routes {
    match &*commands.borrow() {
        Command::Run(r) => r.clone(),
        Command::Close => Routes::new(),
    }
}

/// The peer's OPEN against what is configured: version 4, the expected AS, a usable hold time.
fn check_open(o: &Open, peer: &Peer, config: &SpeakerConfig) -> Result<(), Notification> {
    let n = |subcode, data: Vec<u8>| Notification {
        code: code::OPEN,
        subcode,
        data,
    };
    if o.version != 4 {
        return Err(n(1, vec![0, 4]));
    }
    if o.asn() != peer.asn {
        warn!(
            "BGP peer {}: its OPEN says AS {}, configured AS {}",
            peer.addr,
            o.asn(),
            peer.asn
        );
        return Err(n(2, Vec::new()));
    }
    if o.hold_time == 1 || o.hold_time == 2 {
        return Err(n(6, Vec::new()));
    }
    if o.router_id == config.router_id && peer.asn == peer.local_asn(config) {
        return Err(n(3, Vec::new()));
    }
    Ok(())
}

/// The attributes of a route to this peer: identical on every node (ORIGIN IGP, the same
/// AS_PATH, no MED), so that the router keeps all nodes in one ECMP group.
fn attributes(
    config: &SpeakerConfig,
    peer: &Peer,
    local: IpAddr,
    attrs: &RouteAttrs,
    ctx: Context,
) -> Vec<Attribute> {
    let local_asn = peer.local_asn(config);
    let ibgp = peer.asn == local_asn;
    let mut out = vec![Attribute::Origin(0)];
    let path = if ibgp {
        Vec::new()
    } else {
        vec![Segment {
            kind: AS_SEQUENCE,
            asns: vec![local_asn],
        }]
    };
    let two_octet_overflow = !ctx.four_octet_as && local_asn > u32::from(u16::MAX);
    out.push(Attribute::AsPath(path.clone()));
    if let IpAddr::V4(v4) = local {
        out.push(Attribute::NextHop(v4));
    }
    if ibgp {
        out.push(Attribute::LocalPref(attrs.pool.local_pref.unwrap_or(100)));
    }
    let mut communities = config.communities.clone();
    for c in &attrs.pool.communities {
        if !communities.contains(c) {
            communities.push(*c);
        }
    }
    if attrs.graceful_shutdown {
        communities.push(wire::GRACEFUL_SHUTDOWN);
    }
    if !communities.is_empty() {
        out.push(Attribute::Communities(communities));
    }
    if two_octet_overflow && !path.is_empty() {
        out.push(Attribute::As4Path(path));
    }
    out
}

/// Sends what turns `rib_out` into `wanted`: withdrawals, then announcements grouped by their
/// attributes, each UPDATE within 4096 bytes. `eor`: end with End-of-RIB markers.
async fn sync(
    w: &mut Writer,
    config: &SpeakerConfig,
    peer: &Peer,
    local: IpAddr,
    rib_out: &mut Routes,
    wanted: &Routes,
    eor: bool,
) -> Result<(), String> {
    let ctx = w.ctx;
    let gone: Vec<IpNet> = rib_out
        .0
        .keys()
        .filter(|p| !wanted.0.contains_key(p))
        .copied()
        .collect();
    let mut groups: BTreeMap<RouteAttrs, Vec<IpNet>> = BTreeMap::new();
    for (p, a) in &wanted.0 {
        if rib_out.0.get(p) != Some(a) {
            groups.entry(a.clone()).or_default().push(*p);
        }
    }
    let budget = |overhead: usize| wire::MAX_MESSAGE_LEN - overhead;
    // Withdrawals: IPv4 in the classic field, IPv6 in MP_UNREACH.
    let (gone4, gone6): (Vec<IpNet>, Vec<IpNet>) = gone.iter().partition(|p| p.addr().is_ipv4());
    for chunk in chunks(&gone4, budget(wire::update_overhead(&[], ctx))) {
        let withdrawn = chunk.iter().filter_map(v4_net).collect();
        w.send(&Message::Update(Update {
            withdrawn,
            ..Update::default()
        }))
        .await?;
    }
    let unreach_overhead = wire::update_overhead(
        &[Attribute::MpUnreach {
            afi: AFI_IPV6,
            safi: SAFI_UNICAST,
            withdrawn: Vec::new(),
        }],
        ctx,
    ) + 2; // the attribute may need the extended length
    for chunk in chunks(&gone6, budget(unreach_overhead)) {
        w.send(&Message::Update(Update {
            attributes: vec![Attribute::MpUnreach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                withdrawn: chunk.to_vec(),
            }],
            ..Update::default()
        }))
        .await?;
    }
    for p in &gone {
        rib_out.0.remove(p);
    }
    for (a, prefixes) in &groups {
        let base = attributes(config, peer, local, a, ctx);
        let (v4, v6): (Vec<IpNet>, Vec<IpNet>) = prefixes.iter().partition(|p| p.addr().is_ipv4());
        for chunk in chunks(&v4, budget(wire::update_overhead(&base, ctx))) {
            w.send(&Message::Update(Update {
                withdrawn: Vec::new(),
                attributes: base.clone(),
                nlri: chunk.iter().filter_map(v4_net).collect(),
            }))
            .await?;
        }
        if let IpAddr::V6(nh) = local {
            let mut attrs: Vec<Attribute> = base
                .iter()
                .filter(|a| !matches!(a, Attribute::NextHop(_)))
                .cloned()
                .collect();
            let reach = |nlri: Vec<IpNet>| Attribute::MpReach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                next_hop: nh.octets().to_vec(),
                nlri,
            };
            attrs.push(reach(Vec::new()));
            let overhead = wire::update_overhead(&attrs, ctx) + 2;
            attrs.pop();
            for chunk in chunks(&v6, budget(overhead)) {
                let mut with = attrs.clone();
                with.push(reach(chunk.to_vec()));
                w.send(&Message::Update(Update {
                    attributes: with,
                    ..Update::default()
                }))
                .await?;
            }
        }
        for p in prefixes {
            rib_out.0.insert(*p, a.clone());
        }
    }
    if eor {
        // End-of-RIB (RFC 4724): an empty UPDATE for IPv4, an empty MP_UNREACH for IPv6.
        w.send(&Message::Update(Update::default())).await?;
        w.send(&Message::Update(Update {
            attributes: vec![Attribute::MpUnreach {
                afi: AFI_IPV6,
                safi: SAFI_UNICAST,
                withdrawn: Vec::new(),
            }],
            ..Update::default()
        }))
        .await?;
    }
    if !gone.is_empty() || !groups.is_empty() {
        let shown: Vec<String> = groups
            .iter()
            .map(|(a, p)| {
                format!(
                    "{} prefix(es){}",
                    p.len(),
                    if a.graceful_shutdown {
                        " with graceful-shutdown 65535:0"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        info!(
            "BGP peer {}: announced {}, withdrew {} prefix(es); {} in all",
            peer.addr,
            if shown.is_empty() {
                "nothing".to_owned()
            } else {
                shown.join(", ")
            },
            gone.len(),
            rib_out.0.len()
        );
    }
    Ok(())
}

fn v4_net(p: &IpNet) -> Option<Ipv4Net> {
    match p {
        IpNet::V4(v4) => Some(*v4),
        IpNet::V6(_) => None,
    }
}

/// Splits prefixes into runs whose encoding fits `room` bytes.
fn chunks(prefixes: &[IpNet], room: usize) -> Vec<&[IpNet]> {
    let mut out = Vec::new();
    let (mut start, mut used) = (0, 0);
    for (i, p) in prefixes.iter().enumerate() {
        let n = wire::prefix_len_on_wire(*p);
        if used + n > room && i > start {
            out.push(&prefixes[start..i]);
            start = i;
            used = 0;
        }
        used += n;
    }
    if start < prefixes.len() {
        out.push(&prefixes[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn chunks_fit_and_cover() {
        let ps: Vec<IpNet> = (0..2000u32)
            .map(|i| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(i), 32).unwrap()))
            .collect();
        let cs = chunks(&ps, 4000);
        assert_eq!(cs.iter().map(|c| c.len()).sum::<usize>(), 2000);
        assert!(cs.iter().all(|c| c.len() * 5 <= 4000));
        assert_eq!(cs.len(), 3);
        assert!(chunks(&[], 100).is_empty());
    }

    /// A pool's communities follow the flag's (no duplicate), graceful shutdown last; its
    /// LOCAL_PREF goes to iBGP peers only, 100 without one.
    #[test]
    fn pool_communities_and_local_pref_are_carried() {
        let mut config = SpeakerConfig::for_tests(64512);
        config.communities = vec![(64512 << 16) | 1];
        let ctx = Context {
            four_octet_as: true,
        };
        let local = "192.0.2.10".parse().unwrap();
        let gold = RouteAttrs {
            graceful_shutdown: true,
            pool: super::super::PoolAdvert {
                communities: vec![(64512 << 16) | 100, (64512 << 16) | 1],
                local_pref: Some(200),
            },
        };
        let ebgp = Peer::new("192.0.2.1".parse().unwrap(), 179, 65000);
        let a = attributes(&config, &ebgp, local, &gold, ctx);
        assert!(
            a.contains(&Attribute::Communities(vec![
                (64512 << 16) | 1,
                (64512 << 16) | 100,
                wire::GRACEFUL_SHUTDOWN
            ])),
            "{a:?}"
        );
        assert!(
            !a.iter().any(|x| matches!(x, Attribute::LocalPref(_))),
            "{a:?}"
        );
        let ibgp = Peer::new("192.0.2.1".parse().unwrap(), 179, 64512);
        let a = attributes(&config, &ibgp, local, &gold, ctx);
        assert!(a.contains(&Attribute::LocalPref(200)), "{a:?}");
        let a = attributes(&config, &ibgp, local, &RouteAttrs::default(), ctx);
        assert!(a.contains(&Attribute::LocalPref(100)), "{a:?}");
        assert!(
            a.contains(&Attribute::Communities(vec![(64512 << 16) | 1])),
            "{a:?}"
        );
    }

    #[test]
    fn every_node_sends_identical_attributes() {
        let config = SpeakerConfig::for_tests(64512);
        let peer = Peer::new("192.0.2.1".parse().unwrap(), 179, 65000);
        let ctx = Context {
            four_octet_as: true,
        };
        let a = attributes(
            &config,
            &peer,
            "192.0.2.10".parse().unwrap(),
            &RouteAttrs::default(),
            ctx,
        );
        let b = attributes(
            &config,
            &peer,
            "192.0.2.11".parse().unwrap(),
            &RouteAttrs::default(),
            ctx,
        );
        let strip = |v: Vec<Attribute>| -> Vec<Attribute> {
            v.into_iter()
                .filter(|a| !matches!(a, Attribute::NextHop(_)))
                .collect()
        };
        assert_eq!(strip(a.clone()), strip(b));
        assert!(a.contains(&Attribute::Origin(0)));
        assert!(!a.iter().any(|x| matches!(x, Attribute::Med(_))));
        let g = attributes(
            &config,
            &peer,
            "192.0.2.10".parse().unwrap(),
            &RouteAttrs {
                graceful_shutdown: true,
                ..RouteAttrs::default()
            },
            ctx,
        );
        assert!(g.contains(&Attribute::Communities(vec![wire::GRACEFUL_SHUTDOWN])));
        // A 4-octet AS to a 2-octet peer: AS_TRANS in AS_PATH, the real one in AS4_PATH.
        let mut big = SpeakerConfig::for_tests(4_200_000_000);
        big.communities = vec![];
        let two = Context {
            four_octet_as: false,
        };
        let v = attributes(
            &big,
            &peer,
            "192.0.2.10".parse().unwrap(),
            &RouteAttrs::default(),
            two,
        );
        assert!(v.iter().any(|a| matches!(a, Attribute::As4Path(_))));
    }

    /// BFD's link: only a failure after Up ends the session; the peer's AdminDown does not
    /// (RFC 5882 section 3.2).
    #[tokio::test(flavor = "current_thread")]
    async fn bfd_admin_down_keeps_the_session() {
        let (tx, rx) = watch::channel(Link::Waiting);
        let mut bfd = Some(rx);
        tx.send_replace(Link::Up);
        tx.send_replace(Link::AdminDown);
        let waited = timeout(Duration::from_millis(200), bfd_down(&mut bfd)).await;
        assert!(
            waited.is_err(),
            "the peer's AdminDown ended the BGP session"
        );
        tx.send_replace(Link::Up);
        tx.send_replace(Link::Failed);
        let waited = timeout(Duration::from_millis(200), bfd_down(&mut bfd)).await;
        assert!(waited.is_ok(), "a BFD failure did not end the BGP session");
    }

    /// A router that accepts, completes the OPEN exchange, then never reads again (its TCP
    /// window closes, SO_RCVBUF small) nor sends: the session loop must not hang in a write
    /// (where neither the hold timer nor BFD nor a shutdown could reach it); it ends the
    /// session within the hold time.
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_that_stops_reading_cannot_freeze_the_session() {
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let small: libc::c_int = 4096;
        // SAFETY: setsockopt with a pointer to a live c_int of the length passed.
        let rc = unsafe {
            libc::setsockopt(
                listener.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const small).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let peer = Peer::new(
            Ipv4Addr::LOCALHOST.into(),
            listener.local_addr().unwrap().port(),
            65000,
        );
        let config = SpeakerConfig::for_tests(64512);
        let hold = Duration::from_secs(u64::from(config.hold_time_secs));
        // More UPDATEs (about 5 MB) than loopback's socket buffers take (about 3 MB here).
        let routes = Routes(
            (0..1_000_000u32)
                .map(|i| {
                    let p = Ipv4Net::new(Ipv4Addr::from(0x0a00_0000 + i), 32).unwrap();
                    (IpNet::V4(p), RouteAttrs::default())
                })
                .collect(),
        );
        let (_commands, commands_rx) = watch::channel(Command::Run(routes));
        let (status_tx, mut status) = watch::channel(Status::default());
        tokio::spawn(run(config, peer, commands_rx, status_tx, None));

        let (mut conn, _) = timeout(Duration::from_secs(5), listener.accept())
            .await
            .unwrap()
            .unwrap();
        let ctx = Context {
            four_octet_as: false,
        };
        let mut header = [0u8; wire::HEADER_LEN];
        conn.read_exact(&mut header).await.unwrap();
        let mut open = vec![0u8; wire::message_len(&header).unwrap() - wire::HEADER_LEN];
        conn.read_exact(&mut open).await.unwrap();
        let theirs = Open {
            version: 4,
            my_as: 65000,
            hold_time: 3,
            router_id: Ipv4Addr::new(192, 0, 2, 1),
            capabilities: vec![
                Capability::Multiprotocol {
                    afi: AFI_IPV4,
                    safi: SAFI_UNICAST,
                },
                Capability::FourOctetAs(65000),
            ],
        };
        conn.write_all(&wire::encode(&Message::Open(theirs), ctx))
            .await
            .unwrap();
        conn.write_all(&wire::encode(&Message::Keepalive, ctx))
            .await
            .unwrap();
        // From here on the router neither reads nor writes.
        timeout(Duration::from_secs(5), status.wait_for(|s| s.established))
            .await
            .expect("established")
            .unwrap();
        let since = Instant::now();
        let ended = timeout(hold, status.wait_for(|s| !s.established)).await;
        assert!(
            ended.is_ok(),
            "the session loop did not notice a peer that stopped reading within the hold time {hold:?}"
        );
        eprintln!("session ended {:?} after establishment", since.elapsed());
        drop(conn);
    }

    // A fake router for the tests below: a loopback listener the session connects to, and
    // the messages it reads, each with the moment it arrived.

    /// The configured peer behind a fresh loopback listener.
    async fn fake_router(asn: u32) -> (tokio::net::TcpListener, Peer) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        (listener, Peer::new(Ipv4Addr::LOCALHOST.into(), port, asn))
    }

    /// The context of messages after OPENs with the 4-octet capability on both sides.
    const FOUR: Context = Context {
        four_octet_as: true,
    };

    async fn read_message(half: &mut OwnedReadHalf, ctx: Context) -> Option<Message> {
        let mut header = [0u8; wire::HEADER_LEN];
        half.read_exact(&mut header).await.ok()?;
        let mut msg = header.to_vec();
        msg.resize(wire::message_len(&header).ok()?, 0);
        half.read_exact(&mut msg[wire::HEADER_LEN..]).await.ok()?;
        Some(wire::decode(&msg, ctx).expect("the session sent a malformed message"))
    }

    /// The router's side of a connection: what it reads (from a task, so that it keeps
    /// reading whatever it does meanwhile: the TCP window never closes) and its write half.
    struct Router {
        ours: Open,
        from_session: tokio::sync::mpsc::UnboundedReceiver<(Instant, Message)>,
        write: OwnedWriteHalf,
    }

    impl Router {
        /// Accepts the session's connection, reads its OPEN and answers with an OPEN of AS
        /// `asn` offering `hold` seconds (no KEEPALIVE yet).
        async fn accept(listener: &tokio::net::TcpListener, asn: u32, hold: u16) -> Router {
            let (conn, _) = timeout(Duration::from_secs(5), listener.accept())
                .await
                .expect("the session connects within 5 s")
                .unwrap();
            let (mut read, mut write) = conn.into_split();
            let two = Context {
                four_octet_as: false,
            };
            let Some(Message::Open(ours)) = read_message(&mut read, two).await else {
                panic!("the session's first message is no OPEN");
            };
            let theirs = Open {
                version: 4,
                my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
                hold_time: hold,
                router_id: Ipv4Addr::new(192, 0, 2, 1),
                capabilities: vec![
                    Capability::Multiprotocol {
                        afi: AFI_IPV4,
                        safi: SAFI_UNICAST,
                    },
                    Capability::FourOctetAs(asn),
                ],
            };
            write
                .write_all(&wire::encode(&Message::Open(theirs), two))
                .await
                .unwrap();
            let (tx, from_session) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(m) = read_message(&mut read, FOUR).await {
                    if tx.send((Instant::now(), m)).is_err() {
                        break;
                    }
                }
            });
            Router {
                ours,
                from_session,
                write,
            }
        }

        async fn keepalive(&mut self) {
            self.write
                .write_all(&wire::encode(&Message::Keepalive, FOUR))
                .await
                .unwrap();
        }

        /// The session's messages until its NOTIFICATION (or `by`): the NOTIFICATION with
        /// when it came, and the KEEPALIVEs' arrival times before it.
        async fn until_notification(
            &mut self,
            by: Instant,
        ) -> (Option<(Instant, Notification)>, Vec<Instant>) {
            let mut keepalives = Vec::new();
            loop {
                match tokio::time::timeout_at(by, self.from_session.recv()).await {
                    Err(_) | Ok(None) => return (None, keepalives),
                    Ok(Some((at, Message::Notification(n)))) => {
                        return (Some((at, n)), keepalives);
                    }
                    Ok(Some((at, Message::Keepalive))) => keepalives.push(at),
                    Ok(Some(_)) => {}
                }
            }
        }
    }

    /// A session to `peer` with no routes; its status.
    fn start_session(config: SpeakerConfig, peer: Peer) -> watch::Receiver<Status> {
        let (commands, commands_rx) = watch::channel(Command::Run(Routes::new()));
        let (status_tx, status) = watch::channel(Status::default());
        tokio::spawn(async move {
            run(config, peer, commands_rx, status_tx, None).await;
            drop(commands);
        });
        status
    }

    /// The peer offers 9 s, this speaker 3 s: the session runs on 3 s (RFC 4271 4.2, the
    /// smaller of the two), so it sends a KEEPALIVE every second (a third of it) and, once the
    /// peer falls silent, gives up after 3 s, not 9 s.
    #[tokio::test(flavor = "current_thread")]
    async fn the_hold_time_is_the_smaller_of_the_two_offers() {
        let (listener, peer) = fake_router(65000).await;
        let config = SpeakerConfig::for_tests(64512);
        assert_eq!(config.hold_time_secs, 3);
        let mut status = start_session(config, peer);
        let mut router = Router::accept(&listener, 65000, 9).await;
        assert_eq!(router.ours.hold_time, 3, "the speaker's own offer");
        router.keepalive().await;
        timeout(Duration::from_secs(5), status.wait_for(|s| s.established))
            .await
            .expect("established within 5 s")
            .unwrap();
        // The peer's KEEPALIVE above was its last message.
        let silent = Instant::now();
        let (end, keepalives) = router
            .until_notification(silent + Duration::from_secs(7))
            .await;
        let periods: Vec<Duration> = keepalives.windows(2).map(|w| w[1] - w[0]).collect();
        let Some((at, n)) = end else {
            panic!(
                "the session was still up 7 s after the peer fell silent: it does not run on \
                 the smaller hold time of the two offers (3 s; the peer offered 9 s); its \
                 KEEPALIVEs came {periods:?} apart"
            );
        };
        let lasted = at - silent;
        assert_eq!(
            (n.code, n.subcode),
            (code::HOLD_TIMER, 0),
            "the session ended with {n}, not by its hold timer"
        );
        assert!(
            lasted < Duration::from_secs(5),
            "the hold timer expired {lasted:?} after the peer's last message: not the 3 s \
             negotiated (ours 3 s, the peer's 9 s)"
        );
        assert!(
            !periods.is_empty() && periods.iter().all(|p| *p < Duration::from_secs(2)),
            "KEEPALIVEs {periods:?} apart: not a third of the negotiated 3 s"
        );
        eprintln!(
            "hold timer expired {lasted:?} after the peer fell silent; KEEPALIVEs {periods:?} apart"
        );
    }

    /// A peer of another AS than configured: the session refuses its OPEN with a NOTIFICATION
    /// (OPEN Message Error / Bad Peer AS, RFC 4271 6.2), never comes up, and the log says
    /// which AS came and which was expected.
    #[tokio::test(flavor = "current_thread")]
    async fn a_peer_of_the_wrong_as_is_refused_with_a_notification() {
        capture_logs();
        let (listener, peer) = fake_router(65000).await;
        let mut status = start_session(SpeakerConfig::for_tests(64512), peer);
        let mut router = Router::accept(&listener, 65077, 3).await;
        let (end, keepalives) = router
            .until_notification(Instant::now() + Duration::from_secs(5))
            .await;
        assert!(
            keepalives.is_empty(),
            "the session accepted the OPEN of AS 65077 (configured 65000) with a KEEPALIVE; \
             then {}",
            end.map_or("nothing more".into(), |(_, n)| n.to_string())
        );
        let Some((_, n)) = end else {
            panic!("no NOTIFICATION within 5 s for an OPEN of AS 65077 (configured 65000)");
        };
        assert_eq!(
            (n.code, n.subcode),
            (code::OPEN, 2),
            "the refusal is {n}, not OPEN / Bad Peer AS"
        );
        let why = timeout(Duration::from_secs(5), async {
            loop {
                if let Some(line) = logged(|l| l.contains("65077") && l.contains("65000")) {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("no log line names the peer's AS 65077 and the configured AS 65000");
        assert!(why.starts_with("WARN"), "logged below warn: {why}");
        assert!(
            logged(|l| l.contains("bad peer AS")).is_some(),
            "the session's end is not logged with its reason"
        );
        assert!(!status.borrow_and_update().established);
    }

    /// The session's own hold timer: the peer keeps the TCP connection open and reads
    /// everything, but stops sending. Its KEEPALIVEs keep the session up past the hold time;
    /// after its last one the session ends within the hold time (plus slack), tells the peer
    /// so (NOTIFICATION Hold Timer Expired) and reports itself down.
    #[tokio::test(flavor = "current_thread")]
    async fn the_hold_timer_ends_a_session_whose_peer_falls_silent() {
        let (listener, peer) = fake_router(65000).await;
        let config = SpeakerConfig::for_tests(64512);
        let hold = Duration::from_secs(u64::from(config.hold_time_secs));
        let mut status = start_session(config, peer);
        let mut router = Router::accept(&listener, 65000, 3).await;
        router.keepalive().await;
        timeout(Duration::from_secs(5), status.wait_for(|s| s.established))
            .await
            .expect("established within 5 s")
            .unwrap();
        // KEEPALIVEs every second for longer than the hold time: the session stays up.
        let talking = Instant::now();
        while talking.elapsed() < hold + Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            router.keepalive().await;
            assert!(
                status.borrow().established,
                "the session went down {:?} into a peer's KEEPALIVEs every second (hold time {hold:?})",
                talking.elapsed()
            );
        }
        // Then silence; the connection stays open and read.
        let silent = Instant::now();
        let (end, _) = router
            .until_notification(silent + hold + Duration::from_secs(3))
            .await;
        let Some((at, n)) = end else {
            panic!(
                "no NOTIFICATION {:?} after the peer fell silent (hold time {hold:?}): the \
                 session's own hold timer did not expire (established: {})",
                silent.elapsed(),
                status.borrow().established
            );
        };
        let lasted = at - silent;
        assert_eq!(
            (n.code, n.subcode),
            (code::HOLD_TIMER, 0),
            "the session ended with {n}, not Hold Timer Expired"
        );
        assert!(
            lasted >= hold - Duration::from_millis(200),
            "the session gave up {lasted:?} after the peer's last message, before the hold time {hold:?}"
        );
        timeout(Duration::from_secs(1), status.wait_for(|s| !s.established))
            .await
            .expect("the session still reports itself established after its hold timer expired")
            .unwrap();
        eprintln!("hold timer expired {lasted:?} after the peer's last message");
    }

    /// Log records at info and above, as "LEVEL message" (the tests' own logger).
    static LOGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

    struct Capture;

    impl log::Log for Capture {
        fn enabled(&self, metadata: &log::Metadata) -> bool {
            metadata.level() <= log::Level::Info
        }

        fn log(&self, record: &log::Record) {
            if self.enabled(record.metadata()) {
                LOGS.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
                    "{} {}",
                    record.level(),
                    record.args()
                ));
            }
        }

        fn flush(&self) {}
    }

    fn capture_logs() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            log::set_logger(&Capture).expect("no other logger in the unit tests");
            log::set_max_level(log::LevelFilter::Info);
        });
    }

    /// The first captured line that `matches`.
    fn logged(matches: impl Fn(&str) -> bool) -> Option<String> {
        LOGS.lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|l| matches(l))
            .cloned()
    }
}
