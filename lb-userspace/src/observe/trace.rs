//! `sluice trace`: the balancer's decision for each matching packet, live. The XDP program
//! reports the packets the filter selects (VIP, client prefix, backend) into a ring buffer,
//! at most `--rate` per second and CPU; this side names what it reports (backend addresses,
//! counters) and prints it, one line or one JSON object per packet, then what was lost.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use lb_common::{
    GlobalCounter, NO_BACKEND, NO_SLOT, TraceEvent, TraceFilter, addr_from_raw, raw_addr,
    trace_flags, trace_match, trace_source,
};
use serde_json::{Value, json};

use super::read::{self, FlowFilter};
use super::render::Format;
use crate::{
    dataplane::{Maps, PinLayout, Snapshot, TraceSession, monotonic_ns},
    model::{IpNet, vip_key},
};

/// What to trace and how much.
pub struct TraceArgs {
    pub filter: FlowFilter,
    /// Stop after this many events.
    pub count: Option<u64>,
    /// Events per second and CPU the program reports (0: no limit).
    pub rate: u32,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// The program's side of `filter`: VIP and client compared in the kernel; a backend too when
/// its address holds one slot only (else the events are filtered here, by address).
pub fn kernel_filter(filter: &FlowFilter, slots: &Snapshot, rate: u32) -> TraceFilter {
    let mut f = TraceFilter {
        max_per_sec: rate,
        ..TraceFilter::default()
    };
    if let Some(vip) = &filter.vip {
        f.matches |= trace_match::VIP;
        f.vip = vip_key(vip);
    }
    if let Some(net) = &filter.client {
        f.matches |= trace_match::CLIENT;
        let (addr, family) = raw_addr(net.network());
        let (mask, _) = raw_addr(net.netmask());
        f.client = addr;
        f.client_mask = mask;
        f.client_family = family;
    }
    if let Some(backend) = filter.backend {
        // One entry per backend and way of reaching it, shared by every VIP: the kernel filters
        // by id when the address has one entry, else user space filters by address.
        let ids: Vec<u32> = slots
            .backends
            .iter()
            .filter(|(_, b)| addr_from_raw(&b.addr, b.family) == backend)
            .map(|(id, _)| *id)
            .collect();
        if let [id] = ids[..] {
            f.matches |= trace_match::BACKEND;
            f.backend = id;
        }
    }
    f
}

/// Runs a trace on `iface`'s attachment at `pins` until `args` says stop or SIGINT/SIGTERM.
pub fn run(iface: &str, pins: &PinLayout, args: &TraceArgs, format: Format) -> anyhow::Result<()> {
    pins.check_layout()?;
    let maps = Maps::from_pins(pins)?;
    let mut slots = Snapshot::read(&maps)?;
    let lost_before = lost(&maps)?;
    let filter = kernel_filter(&args.filter, &slots, args.rate);
    let mut session = TraceSession::start(TraceSession::open_pinned(pins)?, filter)?;
    let stop = stop_flag()?;
    let clock = Clock::now()?;
    // On stderr, so that JSON on stdout stays one event per line; scripts wait for it.
    eprintln!(
        "# tracing {iface} ({} events per second and CPU); Ctrl-C stops",
        rate_text(args.rate)
    );
    let started = Instant::now();
    let mut renewed = Instant::now();
    let mut shown = 0u64;
    let mut last_lost = lost_before;
    'trace: while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        if renewed.elapsed() >= Duration::from_secs(1) {
            session.renew()?;
            renewed = Instant::now();
            let now_lost = lost(&maps)?;
            if now_lost != last_lost && format == Format::Table {
                let (rate, ring) = (now_lost.0 - lost_before.0, now_lost.1 - lost_before.1);
                eprintln!("# lost so far: {rate} over the rate, {ring} with the ring full");
            }
            last_lost = now_lost;
        }
        for event in session.poll(Duration::from_millis(200))? {
            if event.backend != NO_BACKEND
                && slots
                    .backends
                    .get(&event.backend)
                    .is_none_or(|b| b.generation != event.generation)
            {
                // An entry given to another backend since the snapshot: read it afresh.
                slots = Snapshot::read(&maps)?;
            }
            let described = describe(&event, &slots, &clock);
            if args.filter.backend.is_some()
                && described.backend != args.filter.backend.map(|a| a.to_string())
            {
                continue;
            }
            let line = match format {
                Format::Json => described.json().to_string(),
                Format::Table => described.line(),
            };
            // A reader that went away (`sluice trace | head`) ends the trace, not a panic.
            if writeln!(std::io::stdout().lock(), "{line}").is_err() {
                break 'trace;
            }
            shown += 1;
            if args.count.is_some_and(|n| shown >= n) {
                break 'trace;
            }
        }
    }
    drop(session);
    let end = lost(&maps)?;
    let (rate, ring) = (end.0 - lost_before.0, end.1 - lost_before.1);
    match format {
        Format::Json => {
            let summary =
                json!({"summary": {"events": shown, "lost_rate": rate, "lost_ring": ring}});
            let _ = writeln!(std::io::stdout().lock(), "{summary}");
        }
        Format::Table => eprintln!(
            "# {shown} events; lost: {rate} over the rate ({} per second and CPU), {ring} with the ring full",
            rate_text(args.rate)
        ),
    }
    Ok(())
}

/// The trace's lost-event counters (over the rate, ring full), summed over CPUs.
fn lost(maps: &Maps) -> anyhow::Result<(u64, u64)> {
    let counters = read::global_counters(maps)?;
    let get = |c: GlobalCounter| {
        counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    };
    Ok((
        get(GlobalCounter::TraceLostRate),
        get(GlobalCounter::TraceLostRing),
    ))
}

fn stop_flag() -> anyhow::Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, stop.clone())
            .context("installing the signal handlers")?;
    }
    Ok(stop)
}

/// bpf_ktime_get_ns (monotonic) to wall-clock time.
pub struct Clock {
    wall_minus_monotonic_ns: i128,
}

impl Clock {
    pub fn now() -> anyhow::Result<Self> {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_nanos() as i128;
        Ok(Self {
            wall_minus_monotonic_ns: wall - monotonic_ns()? as i128,
        })
    }

    fn unix_ns(&self, monotonic: u64) -> i128 {
        monotonic as i128 + self.wall_minus_monotonic_ns
    }
}

/// One event, named: what the program reported, with the backend's address.
#[derive(Debug, Clone, PartialEq)]
pub struct Described {
    pub unix_ns: i128,
    pub cpu: u16,
    pub ifindex: u32,
    pub client: SocketAddr,
    pub vip: String,
    pub syn: bool,
    pub ip_len: u16,
    /// The counter that recorded the fate (e.g. `tx`, `local`, `drop_source_range`).
    pub verdict: &'static str,
    pub action: &'static str,
    /// `conn_table`, `maglev`, `previous_table` (second chance: handed on to the VIP's
    /// previous table's pick), `handed_record` (second chance: on along this node's record of
    /// a flow it handed on at an earlier change) or `none`.
    pub decided_by: &'static str,
    pub slot: Option<(u32, u32)>,
    pub backend: Option<String>,
    pub backend_id: Option<u32>,
    pub generation: u32,
    pub affinity: bool,
    pub recorded: bool,
    /// The second-chance hop, when this node's check ran or it received a handed-on frame.
    pub second_chance: Option<SecondChanceHop>,
}

/// What second chance did with the packet at this node (docs/design.md "Second chance").
#[derive(Debug, Clone, PartialEq)]
pub struct SecondChanceHop {
    /// `checked` (the VIP's current table picked this node and its previous table another:
    /// conntrack asked) or `received` (a frame another node handed on: to this stack).
    pub role: &'static str,
    /// A peer's first-hop frame that this node, its pick, checked (else the client's own).
    pub from_peer: bool,
    /// The sender's table picked this node, this node's picks another (a change not yet
    /// applied on both): a miss goes to this node's own pick, not the previous table's.
    pub tables_disagree: bool,
    /// `hit` (kept here) or `miss` (handed on to the previous table's pick, or along the
    /// record); `None` when not asked (a frame received, this node holding no record of it).
    pub conntrack: Option<&'static str>,
    /// This node had handed the flow on at an earlier change (`HANDED_FLOWS`) and sent it on
    /// to that node again (conntrack did not know it).
    pub record: bool,
    /// The VIP's tables when the event was read: the current one (whose pick was this node)
    /// and the previous one (one change back, whose pick the packet was handed on to).
    pub current_table: Option<u32>,
    pub previous_table: Option<u32>,
}

pub fn describe(event: &TraceEvent, slots: &Snapshot, clock: &Clock) -> Described {
    let flow = &event.flow;
    let client = SocketAddr::new(
        addr_from_raw(&flow.src, flow.family),
        u16::from_be(flow.sport),
    );
    let vip = read::vip_addr(&lb_common::VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    })
    .to_string();
    let backend_id = (event.backend != NO_BACKEND).then_some(event.backend);
    let backend = backend_id.map(|id| {
        slots.backends.get(&id).map_or_else(
            || format!("#{id}"),
            |b| addr_from_raw(&b.addr, b.family).to_string(),
        )
    });
    let vip_info = slots.vips.get(&lb_common::VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    });
    let second_chance = second_chance_hop(event.flags, event.source, vip_info);
    let decided_by = match event.source {
        trace_source::CONN_TABLE => "conn_table",
        trace_source::MAGLEV => "maglev",
        // Second chance: handed on to the VIP's previous table's pick.
        trace_source::PREVIOUS_TABLE => "previous_table",
        // Second chance: on along this node's record of a flow it handed on before.
        trace_source::HANDED_RECORD => "handed_record",
        _ => "none",
    };
    Described {
        unix_ns: clock.unix_ns(event.time_ns),
        cpu: event.cpu,
        ifindex: event.ifindex,
        client,
        vip,
        syn: event.flags & trace_flags::SYN != 0,
        ip_len: event.ip_len,
        verdict: GlobalCounter::ALL
            .get(event.counter as usize)
            .map_or("unknown", |c| c.name()),
        action: xdp_action_name(event.action),
        decided_by,
        slot: (event.slot != NO_SLOT).then_some((event.slot, event.table_size)),
        backend,
        backend_id,
        generation: event.generation,
        affinity: event.flags & trace_flags::AFFINITY != 0,
        recorded: event.source == trace_source::MAGLEV
            && event.flags & trace_flags::NOT_RECORDED == 0,
        second_chance,
    }
}

/// The second-chance hop the event's flags record, with the VIP's tables as read now.
fn second_chance_hop(
    flags: u8,
    source: u8,
    vip: Option<&lb_common::VipInfo>,
) -> Option<SecondChanceHop> {
    let (checked, received) = (
        flags & trace_flags::CONNTRACK_ASKED != 0,
        flags & trace_flags::HANDED_ON != 0,
    );
    if !checked && !received {
        return None;
    }
    let conntrack = checked.then_some(if flags & trace_flags::CONNTRACK_HIT != 0 {
        "hit"
    } else {
        "miss"
    });
    Some(SecondChanceHop {
        role: if received { "received" } else { "checked" },
        from_peer: flags & trace_flags::FROM_PEER != 0,
        tables_disagree: flags & trace_flags::TABLES_DISAGREE != 0,
        conntrack,
        record: source == trace_source::HANDED_RECORD,
        current_table: vip.map(|v| v.table),
        previous_table: vip
            .map(|v| v.previous_table)
            .filter(|t| *t != lb_common::NO_TABLE),
    })
}

impl SecondChanceHop {
    /// E.g. `second chance: a peer's frame, current table #5 picked this node, conntrack
    /// miss: handed on by the previous table #4`.
    fn text(&self) -> String {
        let table = |t: Option<u32>| t.map_or("?".to_owned(), |t| format!("#{t}"));
        let along = "its record of the flow (this node handed it on at an earlier change), conntrack miss: on along the record";
        if self.role == "received" {
            let head = "second chance: handed on to this node by another";
            return match self.conntrack {
                None => format!("{head}: no record of its own, to this stack"),
                Some("hit") => {
                    format!("{head}, with a record of its own, conntrack hit: kept here")
                }
                Some(_) if self.record => format!("{head}, {along}"),
                Some(_) => format!("{head}, with a dead record: to this stack"),
            };
        }
        let situation = if self.tables_disagree {
            format!(
                "second chance: a peer's frame its table gave this node, this node's table {} picks another",
                table(self.current_table)
            )
        } else {
            let peer = if self.from_peer {
                "a peer's frame, "
            } else {
                ""
            };
            format!(
                "second chance: {peer}current table {} picked this node",
                table(self.current_table)
            )
        };
        let outcome = if self.conntrack == Some("hit") {
            "conntrack hit: kept here".to_owned()
        } else if self.record {
            along.to_owned()
        } else if self.tables_disagree {
            "conntrack miss: handed on to this node's pick".to_owned()
        } else {
            format!(
                "conntrack miss: handed on by the previous table {}",
                table(self.previous_table)
            )
        };
        format!("{situation}, {outcome}")
    }

    fn json(&self) -> Value {
        json!({
            "role": self.role,
            "from_peer": self.from_peer,
            "tables_disagree": self.tables_disagree,
            "conntrack": self.conntrack,
            "record": self.record,
            "current_table": self.current_table,
            "previous_table": self.previous_table,
        })
    }
}

pub fn xdp_action_name(action: u32) -> &'static str {
    match action {
        0 => "aborted",
        1 => "drop",
        2 => "pass",
        3 => "tx",
        4 => "redirect",
        _ => "unknown",
    }
}

impl Described {
    /// One line for humans, e.g.
    /// `10:02:03.123456 cpu1 10.0.0.2:40522 -> 10.0.0.100:80/tcp SYN  tx  maglev slot 812/1021 -> 10.0.0.11 (#3 gen 1)`.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} cpu{} {} -> {}{} {}",
            clock_time(self.unix_ns),
            self.cpu,
            self.client,
            self.vip,
            if self.syn { " SYN" } else { "" },
            self.verdict,
        );
        if self.decided_by != "none" {
            line += &format!(" by {}", self.decided_by);
        }
        if let Some((slot, size)) = self.slot {
            // The current table's slot (the previous table's has its own size).
            let table = if self.decided_by == "previous_table" {
                " of the current table"
            } else {
                ""
            };
            line += &format!(" slot {slot}/{size}{table}");
        }
        if let (Some(addr), Some(id)) = (&self.backend, self.backend_id) {
            line += &format!(" -> {addr} (#{id} gen {})", self.generation);
        }
        // Second-chance mode records nothing by design: only the table mode's guard is news.
        if self.decided_by == "maglev" && !self.recorded && self.second_chance.is_none() {
            line += " not recorded (flood guard or second-chance mode)";
        }
        if let Some(hop) = &self.second_chance {
            line += &format!("; {}", hop.text());
        }
        line
    }

    pub fn json(&self) -> Value {
        json!({
            "unix_ns": self.unix_ns.to_string(),
            "time": clock_time(self.unix_ns),
            "cpu": self.cpu,
            "ifindex": self.ifindex,
            "client": self.client.to_string(),
            "vip": self.vip,
            "syn": self.syn,
            "ip_len": self.ip_len,
            "verdict": self.verdict,
            "action": self.action,
            "decided_by": self.decided_by,
            "slot": self.slot.map(|(s, _)| s),
            "table_size": self.slot.map(|(_, n)| n),
            "backend": self.backend,
            "backend_id": self.backend_id,
            "generation": self.generation,
            "affinity": self.affinity,
            "recorded": self.recorded,
            "second_chance": self.second_chance.as_ref().map(SecondChanceHop::json),
        })
    }
}

/// `HH:MM:SS.micros` UTC of a Unix time in nanoseconds.
fn clock_time(unix_ns: i128) -> String {
    let micros = unix_ns.div_euclid(1000);
    let secs = micros.div_euclid(1_000_000);
    let day = secs.rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        micros.rem_euclid(1_000_000)
    )
}

/// The kernel filter's rate: events per second and CPU, 0 for no limit.
fn rate_text(rate: u32) -> String {
    if rate == 0 {
        "unlimited".into()
    } else {
        format!("at most {rate}")
    }
}

/// `--rate`: events per second and CPU (1 or more), or `unlimited` (the kernel filter's 0). A
/// bare 0 is refused: it reads as "nothing", and would mean "no limit".
pub fn parse_rate(text: &str) -> Result<u32, String> {
    if text.eq_ignore_ascii_case("unlimited") {
        return Ok(0);
    }
    match text.parse::<u32>() {
        Ok(0) => Err(
            "0 is not a rate: give events per second and CPU (1 or more, e.g. 1000), \
             or `unlimited` for no limit (a busy VIP can then fill the ring)"
                .into(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "{text:?}: expected events per second and CPU (1 to {}) or `unlimited`",
            u32::MAX
        )),
    }
}

/// `--client`: a prefix, or one address (as /32 or /128).
pub fn parse_client(text: &str) -> Result<IpNet, String> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| format!("invalid client {text:?}: expected an address or a prefix, e.g. 192.0.2.7 or 192.0.2.0/24"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("unlimited"), Ok(0));
        let zero = parse_rate("0").unwrap_err();
        assert!(
            zero.contains("0 is not a rate") && zero.contains("unlimited"),
            "{zero}"
        );
        assert!(parse_rate("-1").is_err());
        assert!(parse_rate("lots").unwrap_err().contains("`unlimited`"));
    }

    #[test]
    fn clock_time_is_utc_time_of_day() {
        // 2026-11-30T01:02:03.000456Z
        let ns = (1_795_741_323i128) * 1_000_000_000 + 456_000;
        assert_eq!(clock_time(ns), "01:02:03.000456");
    }

    #[test]
    fn client_accepts_addresses_and_prefixes() {
        assert_eq!(
            parse_client("192.0.2.7").unwrap().to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_client("192.0.2.7/24").unwrap().to_string(),
            "192.0.2.0/24"
        );
        assert_eq!(
            parse_client("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        let err = parse_client("10.0.0").unwrap_err();
        assert!(err.contains("10.0.0") && err.contains("prefix"), "{err}");
    }

    #[test]
    fn the_second_chance_hop_is_named() {
        let vip = lb_common::VipInfo {
            table: 5,
            previous_table: 4,
            ..Default::default()
        };
        let asked = trace_flags::CONNTRACK_ASKED;
        assert_eq!(
            second_chance_hop(trace_flags::NOT_RECORDED, trace_source::MAGLEV, Some(&vip)),
            None
        );
        let miss = second_chance_hop(
            asked | trace_flags::FROM_PEER,
            trace_source::MAGLEV,
            Some(&vip),
        )
        .unwrap();
        assert_eq!(
            (miss.role, miss.conntrack, miss.from_peer),
            ("checked", Some("miss"), true)
        );
        assert_eq!(
            (miss.current_table, miss.previous_table),
            (Some(5), Some(4))
        );
        assert_eq!(
            miss.text(),
            "second chance: a peer's frame, current table #5 picked this node, conntrack miss: handed on by the previous table #4"
        );
        let hit = second_chance_hop(
            asked | trace_flags::CONNTRACK_HIT,
            trace_source::MAGLEV,
            Some(&vip),
        )
        .unwrap();
        assert_eq!(hit.conntrack, Some("hit"));
        assert!(
            hit.text().ends_with("conntrack hit: kept here"),
            "{}",
            hit.text()
        );
        let disagree = asked | trace_flags::FROM_PEER | trace_flags::TABLES_DISAGREE;
        let disagree = second_chance_hop(disagree, trace_source::MAGLEV, Some(&vip)).unwrap();
        assert!(disagree.tables_disagree);
        assert!(
            disagree
                .text()
                .ends_with("table #5 picks another, conntrack miss: handed on to this node's pick"),
            "{}",
            disagree.text()
        );
        let received =
            second_chance_hop(trace_flags::HANDED_ON, trace_source::MAGLEV, None).unwrap();
        assert_eq!((received.role, received.conntrack), ("received", None));
        assert_eq!(received.json()["previous_table"], Value::Null);
        assert!(
            received
                .text()
                .ends_with("no record of its own, to this stack")
        );

        // This node's record of a flow it handed on at an earlier change, followed: as the
        // pick, and on receiving a handed-on frame.
        let along = "its record of the flow (this node handed it on at an earlier change), conntrack miss: on along the record";
        let pick = second_chance_hop(asked, trace_source::HANDED_RECORD, Some(&vip)).unwrap();
        assert!(pick.record);
        assert_eq!(
            pick.text(),
            format!("second chance: current table #5 picked this node, {along}")
        );
        let relay = asked | trace_flags::HANDED_ON;
        let relay = second_chance_hop(relay, trace_source::HANDED_RECORD, Some(&vip)).unwrap();
        assert_eq!((relay.role, relay.conntrack), ("received", Some("miss")));
        assert_eq!(
            relay.text(),
            format!("second chance: handed on to this node by another, {along}")
        );
        assert_eq!(relay.json()["record"], true);
    }

    #[test]
    fn the_kernel_filter_masks_the_client_prefix() {
        let filter = FlowFilter {
            vip: None,
            backend: None,
            client: Some("10.1.2.0/23".parse().unwrap()),
        };
        let f = kernel_filter(&filter, &Snapshot::default(), 50);
        assert_eq!(f.matches, trace_match::CLIENT);
        assert_eq!(f.client[0], u32::from_ne_bytes([10, 1, 2, 0]));
        assert_eq!(f.client_mask[0], u32::from_ne_bytes([255, 255, 254, 0]));
        assert_eq!(f.max_per_sec, 50);
    }
}
