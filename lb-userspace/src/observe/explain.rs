//! `sluice explain`: what the balancer would do with a flow from one client to one VIP, and why,
//! without sending a packet. It reads the live maps ([`Inputs::read`]) and then replays the XDP
//! program's decision ([`explain`], pure, so its rules have unit tests without root) in the
//! program's own order (lb-ebpf/src/main.rs `balance_flow`):
//!
//!   connection table (not for a TCP SYN; an entry counts only while its VIP id still names the
//!   flow's VIP, its backend is still a member of that VIP's table and the backend's entry still
//!   holds the backend it named: same generation) -> VIP lookup -> source ranges -> Maglev pick
//!   (`flow_hash` % table size; affinity hashes without the ports) -> record (flood guard)
//!   -> forward (this node: its own stack | L2 rewrite | IPIP encapsulation)
//!
//! A frame from another sluice node's MAC (`PEERS`) is passed unbalanced whatever this shows:
//! `explain` takes a client address, not a MAC, and says so when peers are known.
//!
//! In second-chance mode (`flow_state: second-chance`) no flow is recorded, and a non-SYN
//! whose pick changed with its VIP's table meets the second-chance check at its pick
//! ([`SecondChanceView`]): the previous table's pick, and whether that node's conntrack is
//! asked (a hit stays, a miss is handed on to the previous pick). `explain` does not ask
//! conntrack itself: it says what each answer does.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{IpAddr, SocketAddr},
};

use anyhow::{anyhow, bail};
use lb_common::{
    Backend, FAMILY_V4, FlowKey, FlowValue, IPPROTO_TCP, NO_BACKEND, NO_TABLE, TableInfo, VipInfo,
    VipRef, addr_bytes, addr_from_raw, flow_state, forward_mode, raw_addr, source_range_scope,
    vip_flags,
};
use serde::Serialize;

use super::read::{
    FloodGuard, MemberState, flood_guard, installed_or_rebuilt, mode_name, vip_addr,
};
use super::render::render_table;
use crate::{
    dataplane::{Maps, Member, RangeKey, Snapshot, announce_key, members_by_table},
    health::BackendStatus,
    model::{MacAddr, Protocol, VipAddr, vip_key},
};

/// The flow to explain: a client endpoint and a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub client: SocketAddr,
    pub vip: VipAddr,
}

impl Flow {
    /// `CLIENT_IP:PORT` and `VIP:PORT[/PROTO]` as typed on the command line.
    pub fn parse(client: &str, vip: &str) -> anyhow::Result<Self> {
        let client: SocketAddr = client.parse().map_err(|_| {
            anyhow!(
                "client {client:?}: expected CLIENT_IP:PORT, like 192.0.2.7:40312 or [2001:db8::7]:40312"
            )
        })?;
        if client.port() == 0 {
            bail!("client {client}: the port must be from 1 to 65535");
        }
        let vip: VipAddr = vip.parse().map_err(|e| anyhow!("{e}"))?;
        if client.is_ipv4() != vip.addr.is_ipv4() {
            bail!(
                "client {client} and VIP {vip} are of different address families: no packet can carry both"
            );
        }
        Ok(Self { client, vip })
    }

    /// The connection-table key and hash input, exactly as the program builds it from a packet.
    pub fn key(&self) -> FlowKey {
        FlowKey::of(
            self.client.ip(),
            self.client.port(),
            self.vip.addr,
            self.vip.port,
            self.vip.protocol.number(),
        )
    }
}

/// What the maps (and the agent, when it answers) hold that bears on one flow.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    /// The VIP's `VIPS` value, if configured.
    pub vip: Option<VipInfo>,
    /// Every configured VIP (to name them when the asked one is unknown).
    pub vips: Vec<VipAddr>,
    /// The VIP's Maglev table, slot -> backend index.
    pub table: Vec<u32>,
    /// Why the installed table could not be read, when [`Inputs::table`] was rebuilt from the
    /// table's members instead ([`super::read::rebuild_table`]).
    pub table_unreadable: Option<String>,
    /// The members of the VIP's table, with their weights.
    pub members: Vec<Member>,
    /// Every occupied `BACKENDS` entry (an id absent here is empty).
    pub backends: BTreeMap<u32, Backend>,
    /// `VIP_BY_ID` entries that hold a key, and the tables VIPs point at: what decides whether
    /// the connection table's entry is followed.
    pub vip_refs: BTreeMap<u32, VipRef>,
    pub tables: BTreeMap<u32, TableInfo>,
    /// The connection table's entry for this 5-tuple.
    pub entry: Option<FlowValue>,
    pub source_ranges: BTreeSet<RangeKey>,
    /// The MAC this node answers ARP/NDP with for the VIP's address (`ANNOUNCE`).
    pub announce: Option<[u8; 6]>,
    pub flood_guard: Option<FloodGuard>,
    /// Other sluice nodes known on the segment (`PEERS`).
    pub peers: usize,
    /// The attached interface's index: a backend behind it gets `XDP_TX`, others `XDP_REDIRECT`.
    pub ingress_ifindex: Option<u32>,
    /// The agent's health overlay (`/health/backends`), when it answered.
    pub health: Option<Vec<BackendStatus>>,
    /// `Settings::flow_state` is second-chance: no flow recorded, the check below decides.
    pub second_chance_mode: bool,
    /// The VIP's previous table (`VipInfo::previous_table`), slot -> backend index, as
    /// installed or rebuilt from its members; empty when the VIP has none.
    pub previous_table: Vec<u32>,
    /// This node's record of the flow (`HANDED_FLOWS`): it handed the flow on at an earlier
    /// change, to this backend.
    pub handed: Option<FlowValue>,
}

impl Inputs {
    /// Reads what bears on `flow` from the pinned maps.
    pub fn read(maps: &Maps, flow: &Flow) -> anyhow::Result<Self> {
        let snapshot = Snapshot::read(maps)?;
        let key = flow.key();
        let vip = snapshot.vips.get(&vip_key(&flow.vip)).copied();
        let mut by_table = match vip {
            Some(_) => members_by_table(maps, &snapshot.backends)?,
            None => BTreeMap::new(),
        };
        let members = vip
            .and_then(|info| by_table.remove(&info.table))
            .unwrap_or_default();
        // The previous table, read as the program reads it (its own size).
        let previous_table = match (vip, &snapshot.tables) {
            (Some(info), tables) if info.previous_table != NO_TABLE => {
                let size = tables.get(&info.previous_table).map_or(0, |t| t.size);
                let previous = VipInfo {
                    table: info.previous_table,
                    table_size: size,
                    ..info
                };
                let members = by_table.remove(&info.previous_table).unwrap_or_default();
                if size > 0 {
                    installed_or_rebuilt(maps, &members, &previous).0
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        };
        let (table, table_unreadable) = match vip {
            Some(info) if info.table_size > 0 => installed_or_rebuilt(maps, &members, &info),
            _ => (Vec::new(), None),
        };
        let entry = maps.flow(&key)?;
        let handed = maps.handed_flow(&key)?;
        let announce = maps.announced_mac(&announce_key(flow.vip.addr))?;
        let peers = maps.peer_count();
        Ok(Self {
            vip,
            vips: snapshot.vips.keys().map(vip_addr).collect(),
            table,
            table_unreadable,
            members,
            backends: snapshot.backends,
            vip_refs: snapshot.vip_refs,
            tables: snapshot.tables,
            entry,
            source_ranges: snapshot.source_ranges,
            announce,
            // Informative only: an unreadable guard is shown as unknown, not an error.
            flood_guard: flood_guard(maps).ok(),
            peers,
            ingress_ifindex: None,
            health: None,
            second_chance_mode: maps
                .settings()
                .is_ok_and(|s| s.flow_state == flow_state::SECOND_CHANCE),
            previous_table,
            handed,
        })
    }
}

/// One backend of the VIP as `explain` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendView {
    /// Index into `BACKENDS` (per node: addresses are what every node agrees on).
    pub index: u32,
    pub generation: u32,
    pub address: String,
    pub mac: String,
    pub mode: &'static str,
    pub state: MemberState,
    /// The weight as configured (after the agent's health and load overlay).
    pub weight: u32,
    /// Slots it holds in the VIP's Maglev table: the weight as installed.
    pub table_slots: u64,
    pub share: f64,
    /// This node itself: its packets go to the local stack.
    pub local: bool,
    pub ifindex: u32,
    pub mtu: u16,
    /// From the agent's overlay, when it answered.
    pub health: Option<String>,
    pub load: Option<f64>,
    pub base_weight: Option<u32>,
    pub why: Option<String>,
}

/// What one kind of packet of the flow meets.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Outcome {
    /// `connection_table`, `maglev`, `source_ranges`, `vip_lookup`.
    pub decided_by: &'static str,
    /// `XDP_TX`, `XDP_REDIRECT`, `XDP_PASS`, `XDP_DROP`, or `XDP_TX|XDP_REDIRECT` when the
    /// ingress interface is not known here.
    pub action: &'static str,
    /// The global counter the program bumps (`sluice inspect stats`).
    pub counter: &'static str,
    /// Index of the backend it goes to.
    pub backend_index: Option<u32>,
    pub backend: Option<String>,
    /// Whether the program writes a connection-table entry for it (`None`: not applicable).
    pub recorded: Option<bool>,
    pub why: String,
}

/// The connection table's entry for the 5-tuple.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EntryView {
    pub backend_index: u32,
    /// The VIP id the entry was recorded for.
    pub vip_index: u32,
    pub generation: u32,
    /// The address the backend entry holds now (`None`: it is empty).
    pub backend: Option<String>,
    /// Whether the program follows it (same VIP, still a member, same generation).
    pub valid: bool,
    pub why: String,
    /// The connection table stores no timestamp: the age is unknown.
    pub age_seconds: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SourceRanges {
    /// The VIP admits new flows only from its ranges.
    pub enforced: bool,
    /// Ranges of the client's family configured for the VIP.
    pub ranges: Vec<String>,
    pub admitted: bool,
    /// The longest range that holds the client.
    pub matched: Option<String>,
}

/// Second-chance mode: what a non-SYN of the flow that no entry knows meets at its pick
/// (lb-ebpf `second_chance`, docs/design.md "Second chance").
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SecondChanceView {
    /// The VIP's table the pick is from (`current`) and the one kept from before its last
    /// change (`previous`, one generation back: `None` when the VIP has none).
    pub current_table_id: u32,
    pub previous_table_id: Option<u32>,
    /// The previous table's slot for the flow (its own size) and the backend it holds.
    pub previous_slot: Option<u32>,
    pub previous_backend_index: Option<u32>,
    pub previous_backend: Option<String>,
    /// The current pick asks its conntrack: the VIP has a previous table whose pick is
    /// another node than the current pick.
    pub conntrack_asked: bool,
    /// Where the check runs: `this node` (the current pick is this node) or the pick's address
    /// (this node forwards the packet there unchanged and that node checks).
    pub checked_at: Option<String>,
    /// What a conntrack hit and a miss do there.
    pub on_hit: Option<String>,
    pub on_miss: Option<String>,
    pub why: String,
    /// This node handed the flow on at an earlier change, to this node (its record in
    /// `HANDED_FLOWS`, while that backend's entry is the one recorded): a frame of the flow
    /// handed on to this node, or picked for it, goes there unless its conntrack knows it.
    pub handed_to: Option<String>,
}

/// Everything `explain` says about a flow (`-o json` prints it as is: a stable schema).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub client: String,
    pub vip: String,
    pub protocol: Protocol,
    pub vip_id: u32,
    /// The Maglev table the VIP points at (shared by the VIPs with the same backends).
    pub table_id: u32,
    pub table_size: u32,
    pub live_backends: u32,
    pub affinity: bool,
    pub source_ranges: SourceRanges,
    /// The MAC this node answers ARP/NDP with for the VIP's address, if it announces it.
    pub announced_with: Option<String>,
    /// The `ports` word hashed: `sport << 16 | dport` of the raw fields, 0 with affinity.
    pub hash_ports: u32,
    pub flow_hash: u32,
    /// `flow_hash % table_size`.
    pub slot: Option<u32>,
    /// The backend index the slot holds (`None`: no table, or an empty slot).
    pub slot_backend: Option<u32>,
    /// `installed` (read from the map) or `rebuilt` (from the table's members, when the
    /// installed table cannot be read: see the notes).
    pub table: &'static str,
    /// A new connection: a TCP SYN (Maglev decides, whatever the connection table holds, and
    /// the entry is written anew), or a UDP packet of a flow not in the connection table.
    pub new_connection: Outcome,
    pub connection_table: Option<EntryView>,
    /// A TCP packet without SYN, or any UDP packet, of this 5-tuple now.
    pub next_packet: Outcome,
    /// Second-chance mode only: the check the next packet meets at its pick.
    pub second_chance: Option<SecondChanceView>,
    /// The VIP's backends with their weights as installed, by address.
    pub backends: Vec<BackendView>,
    pub flood_guard: Option<FloodGuard>,
    pub peers: usize,
    /// Caveats: things the maps cannot say.
    pub notes: Vec<String>,
}

/// The explanation of `flow` given `inputs`: the program's decision, step by step.
pub fn explain(flow: &Flow, inputs: &Inputs) -> anyhow::Result<Explanation> {
    let Some(vip) = inputs.vip else {
        let known: Vec<String> = inputs.vips.iter().map(ToString::to_string).collect();
        bail!(
            "VIP {} is not configured on this node (its packets are passed to the local stack untouched); configured: {}",
            flow.vip,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    };
    let key = flow.key();
    let vip_key = vip_key(&flow.vip);
    let affinity = vip.flags & vip_flags::AFFINITY != 0;
    let hash = key.hash(affinity);
    let hash_ports = if affinity { 0 } else { key.ports_word() };
    let slot = (vip.table_size > 0).then(|| hash % vip.table_size);
    let slot_backend = slot
        .and_then(|s| inputs.table.get(s as usize).copied())
        .filter(|id| *id != NO_BACKEND);

    // Weights as installed: slots per backend index in this VIP's table.
    let mut held: BTreeMap<u32, u64> = BTreeMap::new();
    for id in &inputs.table {
        *held.entry(*id).or_default() += 1;
    }
    let total_slots = inputs.table.len().max(1) as f64;
    let view = |m: &Member| {
        let (id, b) = (m.id, &m.backend);
        let address = m.addr().to_string();
        let overlay = inputs.health.as_ref().and_then(|rows| {
            rows.iter()
                .find(|r| r.vip == flow.vip.to_string() && r.backend == address)
        });
        let slots = held.get(&id).copied().unwrap_or(0);
        BackendView {
            index: id,
            generation: b.generation,
            address,
            mac: MacAddr(b.dst_mac).to_string(),
            mode: mode_name(b.mode),
            state: MemberState::of(m),
            weight: m.weight,
            table_slots: slots,
            share: slots as f64 / total_slots,
            local: b.mode == forward_mode::LOCAL,
            ifindex: b.ifindex,
            mtu: b.mtu,
            health: overlay.map(|o| o.health.name().to_owned()),
            load: overlay.and_then(|o| o.load),
            base_weight: overlay.map(|o| o.base_weight),
            why: overlay.map(|o| o.why.clone()),
        }
    };
    let mut backends: Vec<BackendView> = inputs.members.iter().map(view).collect();
    backends.sort_by_key(|b| b.address.parse::<IpAddr>().ok());

    let sources = source_ranges(flow, &vip, &inputs.source_ranges);
    let guard_holds = inputs.flood_guard.is_some_and(|g| g.cpus_holding > 0);
    let forward = |decided_by: &'static str, id: u32, b: &Backend, why: String| {
        let address = addr_from_raw(&b.addr, b.family).to_string();
        let (action, counter, how) = if b.mode == forward_mode::LOCAL {
            (
                "XDP_PASS",
                "local",
                "this node itself: passed to its own stack".to_owned(),
            )
        } else {
            let how = match b.mode {
                forward_mode::L2 => format!("L2 rewrite to MAC {}", MacAddr(b.dst_mac)),
                _ => format!(
                    "{} encapsulation to {address} via MAC {}",
                    mode_name(b.mode),
                    MacAddr(b.dst_mac)
                ),
            };
            match inputs.ingress_ifindex {
                Some(i) if i == b.ifindex => ("XDP_TX", "tx", how),
                Some(_) => ("XDP_REDIRECT", "redirected", how),
                None => ("XDP_TX|XDP_REDIRECT", "tx|redirected", how),
            }
        };
        Outcome {
            decided_by,
            action,
            counter,
            backend_index: Some(id),
            backend: Some(address),
            recorded: None,
            why: format!("{why}; {how}"),
        }
    };

    // The slow path of `balance_flow`: source ranges, Maglev pick, record, forward.
    let maglev_path = |syn: bool| -> Outcome {
        if sources.enforced && !sources.admitted {
            return Outcome {
                decided_by: "source_ranges",
                action: "XDP_DROP",
                counter: "drop_source_range",
                backend_index: None,
                backend: None,
                recorded: Some(false),
                why: format!(
                    "the VIP admits new flows only from its source ranges ({}), and {} is in none",
                    if sources.ranges.is_empty() {
                        "none of this family".to_owned()
                    } else {
                        sources.ranges.join(", ")
                    },
                    flow.client.ip()
                ),
            };
        }
        let no_backend = |why: String| Outcome {
            decided_by: "maglev",
            action: "XDP_DROP",
            counter: "drop_no_backend",
            backend_index: None,
            backend: None,
            recorded: Some(false),
            why,
        };
        if vip.live_backends == 0 || vip.table_size == 0 {
            return no_backend("the VIP has no backend that takes new flows".to_owned());
        }
        let (Some(slot), Some(id)) = (slot, slot_backend) else {
            return no_backend(format!(
                "Maglev slot {} holds no backend",
                slot.unwrap_or_default()
            ));
        };
        let Some(b) = inputs.backends.get(&id) else {
            return no_backend(format!(
                "Maglev slot {slot} names backend #{id}, an empty entry: the table is being replaced"
            ));
        };
        let mut out = forward(
            "maglev",
            id,
            b,
            format!(
                "Maglev: hash {hash:#010x} % {} = slot {slot} -> backend #{id}",
                vip.table_size
            ),
        );
        if inputs.second_chance_mode {
            out.recorded = Some(false);
            out.why
                .push_str("; not recorded (second-chance mode records no flow)");
            return out;
        }
        out.recorded = Some(!guard_holds);
        if guard_holds {
            out.why.push_str(
                "; the flood guard holds on some CPUs now: on those the flow is not recorded and rides on Maglev's pick alone",
            );
        } else if syn && inputs.entry.is_some() {
            out.why
                .push_str("; the SYN replaces the connection table's entry with this pick");
        } else {
            out.why.push_str("; recorded in the connection table");
        }
        out
    };

    let tcp = flow.vip.protocol.number() == IPPROTO_TCP;
    let entry = inputs.entry.map(|e| entry_view(&e, inputs, &vip_key));
    // A TCP SYN is balanced afresh whatever the table holds; UDP has no such mark.
    let new_connection = maglev_path(tcp);
    // Second chance looks no entry up (one left from table mode is not followed).
    let followed = inputs
        .entry
        .filter(|_| !inputs.second_chance_mode && entry.as_ref().is_some_and(|v| v.valid))
        .and_then(|e| Some((e, inputs.backends.get(&u32::from(e.backend))?)));
    let next_packet = match followed {
        Some((e, b)) => forward(
            "connection_table",
            u32::from(e.backend),
            b,
            format!(
                "the connection table names backend #{} (generation {})",
                e.backend, e.generation
            ),
        ),
        _ => {
            let mut out = maglev_path(false);
            out.why = if inputs.second_chance_mode {
                format!(
                    "second-chance mode looks up no connection-table entry: {}",
                    out.why
                )
            } else {
                format!("no valid connection-table entry: {}", out.why)
            };
            out
        }
    };

    let second_chance = inputs
        .second_chance_mode
        .then(|| second_chance_view(&key, &vip, &next_packet, inputs));

    let mut notes = vec![
        "the connection table stores no timestamp: an entry's age is unknown (it is evicted least recently used first)".to_owned(),
    ];
    if let Some(e) = &inputs.table_unreadable {
        notes.push(format!(
            "the installed Maglev table could not be read ({e}: opening it takes CAP_SYS_ADMIN, which the agent's pod does not have); slots and shares are from the table rebuilt from its members (TABLE_MEMBERS) as the agent builds it, which is the installed one unless a reconcile is under way"
        ));
    }
    if inputs.peers > 0 {
        notes.push(format!(
            "a frame from one of the {} other sluice nodes' MACs (PEERS) was balanced there already and is passed to the local stack unbalanced",
            inputs.peers
        ));
    }
    if inputs.ingress_ifindex.is_none() {
        notes.push(
            "the attached interface's index is unknown here: a forwarded packet leaves by XDP_TX when the backend's ifindex is the ingress one, else XDP_REDIRECT".to_owned(),
        );
    }
    if backends
        .iter()
        .any(|b| b.mode != "l2" && b.mode != "local" && b.mtu != 0)
    {
        notes.push(
            "encapsulated packets larger than the egress MTU less the outer header are answered with ICMP too big (or dropped)".to_owned(),
        );
    }
    Ok(Explanation {
        client: flow.client.to_string(),
        vip: flow.vip.to_string(),
        protocol: flow.vip.protocol,
        vip_id: vip.id,
        table_id: vip.table,
        table_size: vip.table_size,
        live_backends: vip.live_backends,
        affinity,
        source_ranges: sources,
        announced_with: inputs.announce.map(|m| MacAddr(m).to_string()),
        hash_ports,
        flow_hash: hash,
        slot,
        slot_backend,
        table: if inputs.table_unreadable.is_some() {
            "rebuilt"
        } else {
            "installed"
        },
        new_connection,
        connection_table: entry,
        next_packet,
        second_chance,
        backends,
        flood_guard: inputs.flood_guard,
        peers: inputs.peers,
        notes,
    })
}

/// The second-chance check the next packet meets at its pick (lb-ebpf `second_chance`): asked
/// only when the VIP has a previous table whose pick is another node than the current pick.
fn second_chance_view(
    key: &FlowKey,
    vip: &VipInfo,
    next: &Outcome,
    inputs: &Inputs,
) -> SecondChanceView {
    let address = |id: u32| {
        inputs
            .backends
            .get(&id)
            .map(|b| addr_from_raw(&b.addr, b.family).to_string())
    };
    let is_local = |id: u32| {
        inputs
            .backends
            .get(&id)
            .is_some_and(|b| b.mode == forward_mode::LOCAL)
    };
    let has_previous = vip.previous_table != NO_TABLE && !inputs.previous_table.is_empty();
    let previous_slot = has_previous.then(|| {
        let affinity = vip.flags & vip_flags::AFFINITY != 0;
        key.hash(affinity) % inputs.previous_table.len() as u32
    });
    let previous_id = previous_slot
        .and_then(|s| inputs.previous_table.get(s as usize).copied())
        .filter(|id| *id != NO_BACKEND);
    let current = (next.decided_by == "maglev")
        .then_some(next.backend_index)
        .flatten();
    let mut view = SecondChanceView {
        current_table_id: vip.table,
        previous_table_id: has_previous.then_some(vip.previous_table),
        previous_slot,
        previous_backend_index: previous_id,
        previous_backend: previous_id.and_then(address),
        conntrack_asked: false,
        checked_at: None,
        on_hit: None,
        on_miss: None,
        why: String::new(),
        handed_to: inputs.handed.and_then(|r| {
            let id = u32::from(r.backend);
            inputs
                .backends
                .get(&id)
                .filter(|b| b.generation == r.generation && b.mode != forward_mode::LOCAL)
                .and_then(|_| address(id))
        }),
    };
    // The program reads this node's record before the previous table (lb-ebpf
    // `second_chance`), when it is the pick of a VIP whose table changed.
    if let (Some(to), Some(current)) = (view.handed_to.clone(), current)
        && is_local(current)
        && vip.previous_table != NO_TABLE
    {
        view.conntrack_asked = true;
        view.checked_at = Some("this node".to_owned());
        view.on_hit = Some(
            "its stack takes it (second_chance_hit), and the record is removed: the 5-tuple is a new connection's here".to_owned(),
        );
        view.on_miss = Some(format!(
            "on to {to} along the record (second_chance_record_followed), from the handed-on MAC, one IP hop fewer"
        ));
        view.why = format!(
            "this node handed the flow on to {to} at an earlier change (HANDED_FLOWS): its record comes before the previous table"
        );
        return view;
    }
    let (Some(current), Some(previous)) = (current, previous_id) else {
        view.why = if has_previous {
            "not asked: no pick in one of the tables".to_owned()
        } else {
            "not asked: the VIP's table has not changed since its previous one was released (no previous table)".to_owned()
        };
        return view;
    };
    if previous == current || (is_local(current) && is_local(previous)) {
        view.why = "not asked: the previous table picks the same node".to_owned();
        return view;
    }
    let previous_addr = view.previous_backend.clone().unwrap_or_default();
    view.conntrack_asked = true;
    view.checked_at = Some(if is_local(current) {
        "this node".to_owned()
    } else {
        address(current).unwrap_or_default()
    });
    view.on_hit = Some(
        "its stack takes it (second_chance_hit): the connection is the current pick's".to_owned(),
    );
    view.on_miss = Some(format!(
        "handed on to {previous_addr}, the previous table's pick (second_chance_handed_on), from the handed-on MAC: that node passes it to its stack and never hands it on again"
    ));
    view.why = format!(
        "the previous table (#{}) picks {previous_addr} (slot {}), the current (#{}) {}: the pick asks its conntrack whether the flow began there",
        vip.previous_table,
        previous_slot.unwrap_or_default(),
        vip.table,
        view.checked_at.as_deref().unwrap_or_default(),
    );
    view
}

/// Whether the program follows a connection-table entry (`established_backend`): the entry's
/// VIP id still names this VIP, its backend is still a member of the VIP's table, and the
/// backend's entry has the generation the flow was recorded with.
fn entry_view(e: &FlowValue, inputs: &Inputs, vip_key: &lb_common::VipKey) -> EntryView {
    let (id, vip_id) = (u32::from(e.backend), u32::from(e.vip));
    let backend = inputs.backends.get(&id);
    let vip_ref = inputs.vip_refs.get(&vip_id).filter(|r| r.key == *vip_key);
    let member = vip_ref
        .and_then(|r| inputs.tables.get(&r.table))
        .is_some_and(|t| t.has(id));
    let (valid, why) = match (vip_ref, backend) {
        (None, _) => (
            false,
            format!("VIP #{vip_id} names another VIP now (or none): the flow re-hashes"),
        ),
        (_, None) => (
            false,
            format!("backend #{id} is empty now (its backend was removed): the flow re-hashes"),
        ),
        (_, Some(b)) if b.generation != e.generation => (
            false,
            format!(
                "backend #{id} was given to another backend since (generation {} now, {} recorded): the flow re-hashes",
                b.generation, e.generation
            ),
        ),
        _ if !member => (
            false,
            format!("backend #{id} is no longer one of this VIP's backends: the flow re-hashes"),
        ),
        _ => (
            true,
            format!("backend #{id} is still the one it was recorded with, and one of the VIP's"),
        ),
    };
    EntryView {
        backend_index: id,
        vip_index: vip_id,
        generation: e.generation,
        backend: backend.map(|b| addr_from_raw(&b.addr, b.family).to_string()),
        valid,
        why,
        age_seconds: None,
    }
}

/// The VIP's source ranges of the client's family, and whether one holds the client (the
/// program's longest-prefix lookup in `SOURCE_RANGES`, scoped by VIP id and family).
fn source_ranges(flow: &Flow, vip: &VipInfo, ranges: &BTreeSet<RangeKey>) -> SourceRanges {
    let (_, family) = raw_addr(flow.client.ip());
    let scope = source_range_scope(vip.id, family).to_be();
    let client = addr_bytes(flow.client.ip());
    let mut ours: Vec<(u32, IpAddr, bool)> = Vec::new();
    for (len, key) in ranges {
        if key.scope_be != scope {
            continue;
        }
        let bits = len.saturating_sub(32);
        let prefix = if family == FAMILY_V4 {
            IpAddr::from(<[u8; 4]>::try_from(&key.addr[..4]).unwrap_or_default())
        } else {
            IpAddr::from(key.addr)
        };
        ours.push((bits, prefix, prefix_holds(&key.addr, &client, bits)));
    }
    let matched = ours
        .iter()
        .filter(|(_, _, holds)| *holds)
        .max_by_key(|(bits, _, _)| *bits)
        .map(|(bits, prefix, _)| format!("{prefix}/{bits}"));
    SourceRanges {
        enforced: vip.flags & vip_flags::SOURCE_RANGES != 0,
        ranges: ours
            .iter()
            .map(|(bits, prefix, _)| format!("{prefix}/{bits}"))
            .collect(),
        admitted: vip.flags & vip_flags::SOURCE_RANGES == 0 || matched.is_some(),
        matched,
    }
}

/// Whether the first `bits` bits of `prefix` and `addr` agree.
fn prefix_holds(prefix: &[u8; 16], addr: &[u8; 16], bits: u32) -> bool {
    let bits = bits.min(128) as usize;
    let (whole, rest) = (bits / 8, bits % 8);
    prefix[..whole] == addr[..whole]
        && (rest == 0 || {
            let mask = 0xffu8 << (8 - rest);
            prefix[whole] & mask == addr[whole] & mask
        })
}

/// The explanation for humans.
pub fn render_text(e: &Explanation) -> String {
    let mut out = String::new();
    let tcp = e.protocol == Protocol::Tcp;
    let _ = writeln!(out, "flow        {} -> {}", e.client, e.vip);
    let _ = writeln!(
        out,
        "vip         #{}: Maglev table of {} slots, {} of {} backends take new flows",
        e.vip_id,
        e.table_size,
        e.live_backends,
        e.backends.len()
    );
    let _ = writeln!(
        out,
        "affinity    {}",
        if e.affinity {
            "ClientIP: the hash leaves the ports out (every connection of this client lands on one backend)"
        } else {
            "none: the hash covers addresses, ports and protocol"
        }
    );
    let s = &e.source_ranges;
    let ranges = if s.ranges.is_empty() {
        "none of this family".to_owned()
    } else {
        s.ranges.join(", ")
    };
    let _ = writeln!(
        out,
        "sources     {}",
        match (s.enforced, &s.matched) {
            (false, _) => "any client (no source ranges)".to_owned(),
            (true, Some(m)) => format!("admitted: {m} holds the client (ranges: {ranges})"),
            (true, None) => format!("REFUSED: no range holds the client (ranges: {ranges})"),
        }
    );
    let _ = writeln!(
        out,
        "announce    {}",
        match &e.announced_with {
            Some(mac) => format!("this node answers ARP/NDP for the VIP's address with {mac}"),
            None => "this node does not answer ARP/NDP for the VIP's address".to_owned(),
        }
    );
    let _ = writeln!(
        out,
        "hash        flow_hash(client, vip, ports {:#010x}, proto {}) = {:#010x}{}",
        e.hash_ports,
        e.protocol.number(),
        e.flow_hash,
        match e.slot {
            Some(slot) => format!(" -> slot {slot} of {}", e.table_size),
            None => String::new(),
        }
    );
    if let Some(slot) = e.slot {
        let holder = match e.slot_backend {
            Some(id) => e
                .backends
                .iter()
                .find(|b| b.index == id)
                .map_or(format!("backend #{id}"), |b| {
                    format!(
                        "backend #{id} generation {}: {} mac {} mode {} {}{} weight {}, {} of {} slots ({:.2}%)",
                        b.generation,
                        b.address,
                        b.mac,
                        b.mode,
                        b.state.name(),
                        if b.local { " (this node)" } else { "" },
                        b.weight,
                        b.table_slots,
                        e.table_size,
                        b.share * 100.0
                    )
                }),
            None => "no backend".to_owned(),
        };
        let _ = writeln!(out, "slot {slot:<6} {holder}");
    }
    let outcome = |o: &Outcome| {
        format!(
            "{} {} ({}; counter {}): {}",
            o.action,
            o.backend.as_deref().unwrap_or("-"),
            o.decided_by,
            o.counter,
            o.why
        )
    };
    let _ = writeln!(
        out,
        "{}{}",
        if tcp { "new (SYN)   " } else { "new flow    " },
        outcome(&e.new_connection)
    );
    let _ = writeln!(
        out,
        "conn table  {}",
        match &e.connection_table {
            None => "no entry for this 5-tuple".to_owned(),
            Some(c) => format!(
                "entry -> backend #{} generation {} ({}): {}; age not stored",
                c.backend_index,
                c.generation,
                c.backend.as_deref().unwrap_or("empty slot"),
                c.why
            ),
        }
    );
    let _ = writeln!(
        out,
        "{}{}",
        if tcp { "non-SYN     " } else { "next packet " },
        outcome(&e.next_packet)
    );
    if e.next_packet.backend != e.new_connection.backend {
        let _ = writeln!(
            out,
            "            the connection table and Maglev disagree: an established flow keeps {}, a new one gets {}",
            e.next_packet.backend.as_deref().unwrap_or("-"),
            e.new_connection.backend.as_deref().unwrap_or("-")
        );
    }
    if let Some(sc) = &e.second_chance {
        let _ = writeln!(out, "2nd chance  {}", sc.why);
        if let (Some(hit), Some(miss)) = (&sc.on_hit, &sc.on_miss) {
            let at = sc.checked_at.as_deref().unwrap_or("-");
            let _ = writeln!(out, "            conntrack hit at {at}: {hit}");
            let _ = writeln!(out, "            conntrack miss at {at}: {miss}");
        }
        if let Some(to) = &sc.handed_to {
            let _ = writeln!(
                out,
                "            this node's record: it handed the flow on to {to} at an earlier change; a frame of it handed on to this node goes there too, unless its conntrack knows it"
            );
        }
    }
    if let Some(g) = &e.flood_guard {
        let _ = writeln!(
            out,
            "flood guard {}",
            match g.max_new_flows_per_cpu {
                0 => "off (every new flow is recorded)".to_owned(),
                limit => format!(
                    "{limit} new flows/s per CPU; holding on {} of {} CPUs now",
                    g.cpus_holding, g.cpus
                ),
            }
        );
    }
    out.push('\n');
    let cell = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    out.push_str(&render_table(
        &[
            "BACKEND", "#", "GEN", "STATE", "MODE", "MAC", "WEIGHT", "SLOTS", "SHARE", "HEALTH",
            "LOAD", "WHY",
        ],
        e.backends.iter().map(|b| {
            vec![
                format!("{}{}", b.address, if b.local { " (local)" } else { "" }),
                b.index.to_string(),
                b.generation.to_string(),
                b.state.name().to_owned(),
                b.mode.to_owned(),
                b.mac.clone(),
                b.weight.to_string(),
                b.table_slots.to_string(),
                format!("{:.2}%", b.share * 100.0),
                cell(b.health.clone()),
                cell(b.load.map(|l| format!("{l:.2}"))),
                cell(b.why.clone()),
            ]
        }),
    ));
    for note in &e.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

#[cfg(test)]
mod tests {
    use lb_common::{FlowValue, ScopedAddr, VipKey, flow_hash};

    use super::*;
    use crate::maglev::{MaglevBackend, build_table};
    use crate::observe::read::rebuild_table;

    const VIP: &str = "10.0.0.10:80/tcp";

    fn backend(addr: &str, generation: u32) -> Backend {
        let (raw, family) = raw_addr(addr.parse().unwrap());
        Backend {
            addr: raw,
            family,
            ifindex: 2,
            state: lb_common::backend_state::IN_USE,
            mode: forward_mode::L2,
            dst_mac: [2, 0, 0, 0, 0, raw[0].to_ne_bytes()[3]],
            generation,
            ..Backend::default()
        }
    }

    /// Adds backend entry `id` to the inputs' table with `weight` (drain flag included).
    fn add_member(i: &mut Inputs, id: u32, b: Backend, weight: u32) {
        i.backends.insert(id, b);
        i.members.retain(|m| m.id != id);
        i.members.push(crate::dataplane::Member {
            id,
            backend: b,
            weight: weight & !lb_common::MEMBER_DRAINING,
            draining: weight & lb_common::MEMBER_DRAINING != 0,
        });
        i.members.sort_by_key(|m| m.id);
        i.tables.entry(5).or_default().add(id);
    }

    /// VIP #3 on table #5 of 7 slots over backends #0 (10.0.1.1) and #1 (10.0.1.2), alternating.
    fn inputs(vip: &VipAddr, flags: u32) -> Inputs {
        let mut i = Inputs {
            vip: Some(VipInfo {
                id: 3,
                table: 5,
                table_size: 7,
                live_backends: 2,
                flags,
                previous_table: lb_common::NO_TABLE,
            }),
            vips: vec![*vip],
            table: vec![0, 1, 0, 1, 0, 1, 0],
            ingress_ifindex: Some(2),
            ..Inputs::default()
        };
        i.vip_refs.insert(
            3,
            VipRef {
                key: vip_key(vip),
                table: 5,
            },
        );
        add_member(&mut i, 0, backend("10.0.1.1", 1), 1);
        add_member(&mut i, 1, backend("10.0.1.2", 1), 1);
        i
    }

    fn flow(client: &str, vip: &str) -> Flow {
        Flow::parse(client, vip).unwrap()
    }

    #[test]
    fn the_slot_is_the_programs_hash_of_the_raw_fields() {
        let f = flow("192.0.2.7:40312", VIP);
        let i = inputs(&f.vip, 0);
        let e = explain(&f, &i).unwrap();
        let src = [u32::from_ne_bytes([192, 0, 2, 7]), 0, 0, 0];
        let dst = [u32::from_ne_bytes([10, 0, 0, 10]), 0, 0, 0];
        let ports = ((40312u16.to_be() as u32) << 16) | 80u16.to_be() as u32;
        let h = flow_hash(&src, &dst, ports, 6, FAMILY_V4);
        assert_eq!(e.flow_hash, h);
        assert_eq!(e.hash_ports, ports);
        assert_eq!(e.slot, Some(h % 7));
        let want = i.table[(h % 7) as usize];
        assert_eq!(e.new_connection.backend_index, Some(want));
        assert_eq!(e.new_connection.action, "XDP_TX");
        assert_eq!(e.new_connection.counter, "tx");
        assert_eq!(e.next_packet.backend_index, Some(want));
        assert_eq!(e.connection_table, None);
        // Weights as installed: 4 and 3 slots of 7.
        let slots: Vec<u64> = e.backends.iter().map(|b| b.table_slots).collect();
        assert_eq!(slots, [4, 3]);
    }

    #[test]
    fn a_rebuilt_table_is_the_control_planes() {
        let vip: VipAddr = VIP.parse().unwrap();
        let mut i = inputs(&vip, 0);
        i.vip.as_mut().unwrap().table_size = 251;
        // Another table's backend and a draining member take no part.
        i.backends.insert(7, backend("10.0.1.3", 1));
        add_member(
            &mut i,
            9,
            backend("10.0.1.4", 1),
            1 | lb_common::MEMBER_DRAINING,
        );
        add_member(&mut i, 1, backend("10.0.1.2", 1), 3);
        let rebuilt = rebuild_table(&i.members, 251);
        let want = build_table(
            &[
                MaglevBackend {
                    id: u32::from(std::net::Ipv4Addr::new(10, 0, 1, 1)),
                    weight: 1,
                },
                MaglevBackend {
                    id: u32::from(std::net::Ipv4Addr::new(10, 0, 1, 2)),
                    weight: 3,
                },
            ],
            251,
        );
        // Indices 0 and 1 of the inputs are backends #0 and #1.
        assert_eq!(rebuilt, want);
        let ones = rebuilt.iter().filter(|s| **s == 1).count();
        assert!((185..=192).contains(&ones), "{ones}");
        i.table = rebuilt;
        i.table_unreadable = Some("EPERM".into());
        let e = explain(&flow("192.0.2.7:1", VIP), &i).unwrap();
        assert_eq!(e.table, "rebuilt");
        assert!(e.notes.iter().any(|n| n.contains("CAP_SYS_ADMIN")));
    }

    #[test]
    fn affinity_hashes_without_ports() {
        let vip: VipAddr = VIP.parse().unwrap();
        let i = inputs(&vip, vip_flags::AFFINITY);
        let a = explain(&flow("192.0.2.7:1000", VIP), &i).unwrap();
        let b = explain(&flow("192.0.2.7:2000", VIP), &i).unwrap();
        assert_eq!(a.hash_ports, 0);
        assert_eq!(a.flow_hash, b.flow_hash);
        assert!(a.affinity);
    }

    #[test]
    fn a_syn_follows_maglev_and_a_later_packet_the_entry() {
        let f = flow("192.0.2.7:40312", VIP);
        let mut i = inputs(&f.vip, 0);
        let pick = explain(&f, &i)
            .unwrap()
            .new_connection
            .backend_index
            .unwrap();
        let other = 1 - pick;
        i.entry = Some(FlowValue {
            backend: other as u16,
            vip: 3,
            generation: 1,
        });
        let e = explain(&f, &i).unwrap();
        assert_eq!(e.new_connection.backend_index, Some(pick));
        assert!(e.new_connection.why.contains("replaces"));
        assert_eq!(e.next_packet.decided_by, "connection_table");
        assert_eq!(e.next_packet.backend_index, Some(other));
        assert!(e.connection_table.as_ref().unwrap().valid);
        assert!(render_text(&e).contains("disagree"));
        // UDP has no SYN: every packet follows a valid entry; "new" is the Maglev path.
        let u = flow("192.0.2.7:40312", "10.0.0.10:80/udp");
        let mut iu = inputs(&u.vip, 0);
        iu.entry = i.entry;
        let e = explain(&u, &iu).unwrap();
        assert_eq!(e.next_packet.decided_by, "connection_table");
        // A draining member keeps its established flows (it is still in the table's bits); a
        // table of draining members only has no pick.
        for id in [0, 1] {
            let b = i.backends[&id];
            add_member(&mut i, id, b, 1 | lb_common::MEMBER_DRAINING);
        }
        i.vip.as_mut().unwrap().live_backends = 0;
        let e = explain(&f, &i).unwrap();
        assert!(e.connection_table.as_ref().unwrap().valid);
        assert_eq!(e.next_packet.backend_index, Some(other));
        assert_eq!(e.new_connection.counter, "drop_no_backend");
    }

    #[test]
    fn a_stale_entry_is_not_followed() {
        let f = flow("192.0.2.7:40312", VIP);
        let i = inputs(&f.vip, 0);
        let pick = explain(&f, &i).unwrap().new_connection.backend_index;
        let entry = |backend: u16, vip: u16, generation: u32| FlowValue {
            backend,
            vip,
            generation,
        };
        let no_longer_member = |j: &mut Inputs| {
            j.tables.insert(5, TableInfo::default());
            j.tables.get_mut(&5).unwrap().add(0);
        };
        let other_vip = |j: &mut Inputs| {
            j.vip_refs.get_mut(&3).unwrap().key = VipKey::default();
        };
        for (name, entry, change) in [
            // The entry was given to another backend since (generation bumped).
            ("generation", entry(0, 3, 0), None),
            // The entry is empty now.
            ("empty", entry(5, 3, 1), None),
            // The backend left the VIP's table.
            (
                "member",
                entry(1, 3, 1),
                Some(no_longer_member as fn(&mut Inputs)),
            ),
            // The VIP id names another VIP now.
            ("vip", entry(1, 3, 1), Some(other_vip as fn(&mut Inputs))),
            // ... or none at all.
            ("no vip", entry(1, 4, 1), None),
        ] {
            let mut j = i.clone();
            if let Some(change) = change {
                change(&mut j);
            }
            j.entry = Some(entry);
            let e = explain(&f, &j).unwrap();
            assert!(!e.connection_table.as_ref().unwrap().valid, "{name}");
            assert_eq!(e.next_packet.decided_by, "maglev", "{name}");
            assert_eq!(e.next_packet.backend_index, pick, "{name}");
        }
        // And the entry of the tests above is valid as it stands.
        let mut j = i.clone();
        j.entry = Some(entry(1, 3, 1));
        assert!(explain(&f, &j).unwrap().connection_table.unwrap().valid);
    }

    #[test]
    fn source_ranges_refuse_or_admit_by_longest_prefix_of_the_family() {
        let f = flow("192.0.2.7:40312", VIP);
        let mut i = inputs(&f.vip, vip_flags::SOURCE_RANGES);
        let range = |vip_id: u32, family: u8, a: [u8; 4], bits: u32| {
            let mut addr = [0u8; 16];
            addr[..4].copy_from_slice(&a);
            (
                ScopedAddr::prefix_len(bits),
                ScopedAddr {
                    scope_be: source_range_scope(vip_id, family).to_be(),
                    addr,
                },
            )
        };
        i.source_ranges
            .insert(range(3, FAMILY_V4, [198, 51, 100, 0], 24));
        // Another VIP's range, and another family's, never count.
        i.source_ranges
            .insert(range(4, FAMILY_V4, [192, 0, 2, 0], 24));
        i.source_ranges
            .insert(range(3, lb_common::FAMILY_V6, [192, 0, 2, 0], 24));
        let e = explain(&f, &i).unwrap();
        assert_eq!(e.new_connection.counter, "drop_source_range");
        assert_eq!(e.new_connection.action, "XDP_DROP");
        assert_eq!(e.source_ranges.ranges, ["198.51.100.0/24"]);
        i.source_ranges
            .insert(range(3, FAMILY_V4, [192, 0, 0, 0], 8));
        i.source_ranges
            .insert(range(3, FAMILY_V4, [192, 0, 2, 0], 23));
        let e = explain(&f, &i).unwrap();
        assert_eq!(e.new_connection.decided_by, "maglev");
        assert_eq!(e.source_ranges.matched.as_deref(), Some("192.0.2.0/23"));
    }

    #[test]
    fn local_backend_empty_slot_and_no_live_backends() {
        let f = flow("192.0.2.7:40312", VIP);
        let mut i = inputs(&f.vip, 0);
        for b in i.backends.values_mut() {
            b.mode = forward_mode::LOCAL;
        }
        let e = explain(&f, &i).unwrap();
        assert_eq!(
            (e.new_connection.action, e.new_connection.counter),
            ("XDP_PASS", "local")
        );
        let mut j = inputs(&f.vip, 0);
        j.table = vec![NO_BACKEND; 7];
        let e = explain(&f, &j).unwrap();
        assert_eq!(e.new_connection.counter, "drop_no_backend");
        let mut k = inputs(&f.vip, 0);
        k.vip.as_mut().unwrap().live_backends = 0;
        assert_eq!(
            explain(&f, &k).unwrap().new_connection.counter,
            "drop_no_backend"
        );
        // An empty backend entry in the slot (a table being replaced) takes no new flow.
        let mut d = inputs(&f.vip, 0);
        d.backends.clear();
        assert_eq!(
            explain(&f, &d).unwrap().new_connection.counter,
            "drop_no_backend"
        );
    }

    #[test]
    fn second_chance_shows_the_previous_pick_and_where_conntrack_is_asked() {
        let f = flow("192.0.2.7:40312", VIP);
        let mut i = inputs(&f.vip, 0);
        i.second_chance_mode = true;
        // No previous table: nothing is asked, nothing recorded.
        let e = explain(&f, &i).unwrap();
        let sc = e.second_chance.clone().unwrap();
        assert!(
            !sc.conntrack_asked && sc.previous_table_id.is_none(),
            "{sc:?}"
        );
        assert!(sc.why.contains("no previous table"), "{}", sc.why);
        assert_eq!(e.next_packet.recorded, Some(false));
        assert!(
            e.next_packet.why.contains("records no flow"),
            "{}",
            e.next_packet.why
        );

        // A previous table (#4, 5 slots) that picks the other backend: the pick is asked.
        let current = e.next_packet.backend_index.unwrap();
        let other = 1 - current;
        i.vip.as_mut().unwrap().previous_table = 4;
        i.previous_table = vec![other; 5];
        let e = explain(&f, &i).unwrap();
        let sc = e.second_chance.clone().unwrap();
        let other_addr = ["10.0.1.1", "10.0.1.2"][other as usize];
        assert!(sc.conntrack_asked, "{sc:?}");
        assert_eq!(sc.previous_table_id, Some(4));
        assert_eq!(sc.current_table_id, 5);
        assert_eq!(sc.previous_slot, Some(f.key().hash(false) % 5));
        assert_eq!(sc.previous_backend.as_deref(), Some(other_addr));
        assert_eq!(sc.checked_at, e.next_packet.backend, "a peer checks it");
        assert!(sc.on_miss.as_deref().unwrap().contains(other_addr));
        let text = render_text(&e);
        assert!(
            text.contains("2nd chance  the previous table (#4)")
                && text.contains(&format!(
                    "conntrack miss at {}",
                    e.next_packet.backend.as_deref().unwrap()
                )),
            "{text}"
        );

        // The same pick both times (another node): not asked.
        i.previous_table = vec![current; 5];
        let sc = explain(&f, &i).unwrap().second_chance.unwrap();
        assert!(
            !sc.conntrack_asked && sc.why.contains("same node"),
            "{sc:?}"
        );

        // This node is the pick, the previous table another: it asks its own conntrack.
        i.previous_table = vec![other; 5];
        i.backends.get_mut(&current).unwrap().mode = forward_mode::LOCAL;
        let sc = explain(&f, &i).unwrap().second_chance.unwrap();
        assert_eq!(sc.checked_at.as_deref(), Some("this node"));

        // A record of this node's (it handed the flow on to the other backend at an earlier
        // change): followed before the previous table.
        i.previous_table = vec![current; 5];
        i.handed = Some(FlowValue {
            backend: other as u16,
            vip: 0,
            generation: i.backends[&other].generation,
        });
        let e = explain(&f, &i).unwrap();
        let sc = e.second_chance.clone().unwrap();
        assert_eq!(sc.handed_to.as_deref(), Some(other_addr));
        assert!(sc.conntrack_asked && sc.why.contains("record"), "{sc:?}");
        assert!(
            sc.on_miss.as_deref().unwrap().contains("along the record"),
            "{sc:?}"
        );
        assert!(
            render_text(&e).contains("this node's record"),
            "{}",
            render_text(&e)
        );
        // A record whose backend's entry holds another backend now (its generation): dead.
        i.handed.as_mut().unwrap().generation += 1;
        let sc = explain(&f, &i).unwrap().second_chance.unwrap();
        assert_eq!(sc.handed_to, None);
        assert!(sc.why.contains("same node"), "{sc:?}");
        i.handed = None;

        // Table mode: no second-chance view, the flow is recorded.
        i.second_chance_mode = false;
        let e = explain(&f, &i).unwrap();
        assert!(e.second_chance.is_none());
        assert_eq!(e.next_packet.recorded, Some(true));
    }

    #[test]
    fn bad_arguments_and_unknown_vips_say_what_is_wrong() {
        let err = |c: &str, v: &str| Flow::parse(c, v).unwrap_err().to_string();
        assert!(err("192.0.2.7", VIP).contains("CLIENT_IP:PORT"));
        assert!(err("192.0.2.7:0", VIP).contains("1 to 65535"));
        assert!(err("192.0.2.7:1", "10.0.0.10").contains("ADDRESS:PORT"));
        assert!(err("192.0.2.7:1", "10.0.0.10:80/sctp").contains("ADDRESS:PORT"));
        assert!(err("[2001:db8::1]:1", VIP).contains("different address families"));
        let f = flow("192.0.2.7:1", "10.0.0.11:80/tcp");
        let mut i = inputs(&flow("192.0.2.7:1", VIP).vip, 0);
        i.vip = None;
        let e = explain(&f, &i).unwrap_err().to_string();
        assert!(e.contains("10.0.0.11:80/tcp is not configured"), "{e}");
        assert!(e.contains(VIP), "{e}");
    }
}
