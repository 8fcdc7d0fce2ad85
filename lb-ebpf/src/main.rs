//! sluice's balancer object.
//!
//! `sluice_balancer`, one pass per packet, each step an inlined function that either decides the
//! packet's fate or hands it on (Katran's shape):
//!
//!   parse (Ethernet [802.1Q tag] / IPv4|IPv6 / TCP|UDP|ICMP) -> VIP address filter -> from a peer?
//!     -> connection table (not for a SYN) -> VIP lookup -> source ranges -> Maglev pick
//!     -> record (flood guard) | second chance (records of flows handed on, conntrack, previous table)
//!     -> forward (this node: its own stack | L2 rewrite | IPIP/IP6IP6 encap)
//!     -> trace (only while `sluice trace` runs: a matching packet's decision to `TRACE_EVENTS`)
//!
//! Every node balances AND serves (the agent is a DaemonSet), so a packet is balanced at most
//! once: a pick of this node itself goes to its own stack (`XDP_PASS`, counted `local`), a VIP
//! frame from another sluice node's MAC (`PEERS`) was balanced there and goes to the stack too
//! (`from_peer`), whatever this node's connection table holds, and IPIP/IP6IP6 from another
//! node is unwrapped inline (`DECAP_*`, the stand-alone decapsulator's logic) and passed. In
//! second-chance mode a peer's frame that this node's VIP table change concerns runs the
//! second-chance check here, and may be handed on once (marked: `PEERS` says which frame is
//! which, lb-common `peer_frame`); a handed-on frame goes to the stack unless this node
//! handed that flow on itself at an earlier change (`HANDED_FLOWS`): then on to where it went.
//!
//! A TCP SYN skips the connection table: a new connection is balanced afresh, whatever an old
//! one on the same 5-tuple left there. A new flow is recorded unless the flood guard holds
//! (`SETTINGS`, `NEW_FLOWS`: new flows per second and CPU); then Maglev's pick alone carries it.
//!
//! Also: ARP requests and IPv6 Neighbor Solicitations (`neighbour`, `ndp.rs`) for an address
//! this node announces (`ANNOUNCE`, the agent's election) are answered; echo requests to a VIP
//! address are answered; ICMP errors quoting a VIP flow go to the backend that owns the flow
//! (never answered with ICMP); a packet too big to encapsulate gets ICMP "too big" back.
//! Not for a VIP address: `XDP_PASS`, untouched, however malformed. For a VIP: rewritten and
//! sent with `XDP_TX` or `XDP_REDIRECT`, or dropped and counted by reason. No per-packet
//! logging; loops are bounded. The stack is near the verifier's 512 bytes (496): new
//! per-packet state belongs in a per-CPU map, not on the stack.
//!
//! `sluice_pass`: returns `XDP_PASS`. A veth only delivers `XDP_TX` frames when its peer has an
//! XDP program; labs attach this one there (`sluice xdp-pass`). `sluice_conntrack_probe`: asks
//! conntrack about one flow, for the agent (never attached).
#![no_std]
#![no_main]

// The steps by concern, each in src/balancer/ (this program's own; the lib's modules are
// shared with the decapsulator). The chain that calls them stays here.
mod balancer {
    /// This node's conntrack, asked on second chance's rare path.
    pub mod conntrack;
    /// IPIP / IP6IP6 encapsulation.
    pub mod encap;
    /// Second chance over several changes: the records of the flows this node handed on.
    pub mod handed;
    /// ICMP written here: "too big", echo replies.
    pub mod icmp;
    /// The BPF maps (user space finds them by name).
    pub mod maps;
    /// ARP and NDP answers for announced addresses.
    pub mod neighbour;
    /// Per-CPU one-second rate windows (flood guard, trace rate).
    pub mod rate;
    /// `sluice trace` events.
    pub mod trace;
}

use aya_ebpf::{
    bindings::xdp_action, btf_maps::PerCpuArray, btf_maps::lpm_trie::Key, macros::xdp,
    programs::XdpContext,
};
use lb_common::{
    Backend, Counters, FAMILY_V4, FlowKey, FlowValue, GlobalCounter, IP6IP6_OVERHEAD,
    IPIP_OVERHEAD, IPPROTO_IPIP, IPPROTO_IPV6, NO_BACKEND, NO_TABLE, PeerKey, ScopedAddr, VipInfo,
    VipKey, backend_state, flow_state, forward_mode, handed_on_mac, peer_frame, source_range_scope,
    trace_flags, trace_source, vip_flags,
};
use lb_ebpf::{
    packet::{self, ETH_HLEN, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, EthHdr, Flow, L3, Parsed},
    unwrap::{Unwrapped, unwrap},
};

use balancer::conntrack;
use balancer::encap::encapsulate;
use balancer::handed::{self, Record};
use balancer::icmp::{echo_reply, too_big};
use balancer::maps::{
    BACKEND_STATS, BACKENDS, DECAP_LOCAL, DECAP_SOURCES, FLOWS, FLOWS6, GLOBAL_STATS, MAGLEV,
    PEER_FILTER, PEERS, SETTINGS, SOURCE_RANGES, TABLES, TX_PORTS, VIP_ADDRS, VIP_BY_ID,
    VIP_FILTER, VIP_STATS, VIPS,
};
use balancer::neighbour::{arp_reply, neighbor_advert};
use balancer::rate::new_flow_admitted;
use balancer::trace::{Why, trace};

#[xdp]
pub fn sluice_balancer(ctx: XdpContext) -> u32 {
    let (action, counter) = balance(&ctx);
    count(counter);
    action
}

#[xdp]
pub fn sluice_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Does this namespace's conntrack know the flow whose [`FlowKey`] the frame's first bytes
/// are? `XDP_PASS` yes, `XDP_DROP` no, `XDP_ABORTED` a frame too short. Never attached: the
/// agent runs it (BPF_PROG_TEST_RUN, which asks the caller's namespace) on a loopback
/// connection of its own, to learn whether conntrack tracks this node's connections, with
/// the very lookup second chance makes (`flow_state: auto`).
#[xdp]
pub fn sluice_conntrack_probe(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + size_of::<FlowKey>() > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    // SAFETY: within the frame, checked above; read unaligned, by value.
    let key = unsafe { core::ptr::read_unaligned(start as *const FlowKey) };
    if conntrack::knows(&ctx, &key) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The whole decision: the XDP action and the global counter that records why.
#[inline(always)]
fn balance(ctx: &XdpContext) -> (u32, GlobalCounter) {
    // One instance of everything below per family: the IPv4 one is compiled knowing the
    // family, so it carries no IPv6 work (measured: the shared instance cost IPv4 ~20 ns).
    // `l2`: 14, or 18 after an 802.1Q tag (any VLAN id: a VIP is answered on every VLAN).
    // Everything after the link layer is read at `l2`, and a tagged frame leaves with its tag.
    let Some((proto, l2)) = packet::link_layer(ctx) else {
        // Shorter than its link-layer header: not a frame sluice forwards.
        return (xdp_action::XDP_PASS, GlobalCounter::Passed);
    };
    // One instance for both link-layer lengths: an instance per length (offsets constant in
    // each, ~2 ns less per established IPv4 packet) makes the program too long for BPF's
    // 16-bit jumps once second chance is in it ("Branch target out of insn range").
    balance_l2(ctx, proto, l2)
}

/// What follows the link layer (`l2` bytes) of a frame carrying `proto`.
#[inline(always)]
fn balance_l2(ctx: &XdpContext, proto: u16, l2: usize) -> (u32, GlobalCounter) {
    match proto {
        ETH_P_IP => balance_ip(ctx, packet::parse_ipv4(ctx, l2, vip_addressed)),
        ETH_P_IPV6 => {
            let ip = packet::parse_ipv6(ctx, l2, vip_addressed);
            // A Neighbor Solicitation for an announced address: IPv6's ARP (ndp.rs).
            if let Ok((l3, true)) = &ip
                && let Some(answer) = neighbor_advert(ctx, l3)
            {
                return answer;
            }
            balance_ip(ctx, ip)
        }
        ETH_P_ARP => arp_reply(ctx, l2),
        // Other protocols, QinQ (a second tag) included: the kernel's.
        _ => (xdp_action::XDP_PASS, GlobalCounter::Passed),
    }
}

#[inline(always)]
fn balance_ip(ctx: &XdpContext, ip: Result<(L3, bool), Parsed>) -> (u32, GlobalCounter) {
    // Encapsulated by another node for this one: unwrap and hand to the stack, never balance.
    if let Ok((l3, _)) = &ip
        && (l3.proto == IPPROTO_IPIP || l3.proto == IPPROTO_IPV6)
    {
        match unwrap(ctx, &DECAP_SOURCES, &DECAP_LOCAL) {
            Unwrapped::NotOurs => {}
            Unwrapped::Done => return (xdp_action::XDP_PASS, GlobalCounter::Decapsulated),
            Unwrapped::ForbiddenSource => {
                return (xdp_action::XDP_DROP, GlobalCounter::DropDecapSource);
            }
            Unwrapped::Malformed => return (xdp_action::XDP_DROP, GlobalCounter::DropMalformed),
        }
    }
    // Every packet sluice acts on is addressed to a VIP address: the one-bit filter lets all
    // other traffic go before its L4 header is even read.
    let filter = VIP_FILTER.get(0);
    let may_be_ours = |l3: &L3| filter.is_some_and(|f| f.may_contain(&l3.dst));
    match packet::parse_l4(ctx, ip, may_be_ours, vip_addressed) {
        Parsed::Flow(flow) => {
            let mut why = Why::NONE;
            let verdict = match peer_frame(ctx) {
                None => balance_flow(ctx, &flow, &mut why),
                Some(peer_frame::FIRST_HOP) => first_hop_from_peer(ctx, &flow, &mut why),
                Some(_) => handed_on_frame(ctx, &flow, &mut why),
            };
            trace(ctx, &flow, verdict, &why);
            verdict
        }
        Parsed::IcmpError(_) if peer_frame(ctx).is_some() => {
            (xdp_action::XDP_PASS, GlobalCounter::FromPeer)
        }
        Parsed::EchoRequest(l3) if is_vip_address(&l3) => echo_reply(ctx, &l3),
        // Traced by the flow it quotes (client -> VIP); its counter says it was ICMP.
        Parsed::IcmpError(flow) => {
            let mut why = Why::NONE;
            let verdict = icmp_error(ctx, &flow, &mut why);
            trace(ctx, &flow, verdict, &why);
            verdict
        }
        Parsed::NoL4 { l3, fragment } if is_vip_address(&l3) => {
            // Katran's policy: fragments of a VIP flow cannot be hashed (no ports in later
            // ones), so none is forwarded, and none can reach a wrong backend.
            let reason = if fragment {
                GlobalCounter::DropFragment
            } else {
                GlobalCounter::DropUnparsed
            };
            (xdp_action::XDP_DROP, reason)
        }
        // Only a packet for a VIP address is sluice's to drop; the rest is the kernel's.
        Parsed::Malformed { for_vip: true } => (xdp_action::XDP_DROP, GlobalCounter::DropMalformed),
        _ => (xdp_action::XDP_PASS, GlobalCounter::Passed),
    }
}

/// A TCP or UDP packet: established flow, else new flow, else not ours.
#[inline(always)]
fn balance_flow(ctx: &XdpContext, flow: &Flow, why: &mut Why) -> (u32, GlobalCounter) {
    if flow.l3.first_fragment {
        return if is_vip_address(&flow.l3) {
            (xdp_action::XDP_DROP, GlobalCounter::DropFragment)
        } else {
            (xdp_action::XDP_PASS, GlobalCounter::Passed)
        };
    }
    let vip_key = vip_key_of(&flow.key);
    let bytes = (ctx.data_end() - ctx.data()) as u64;

    // Second chance records no flow, so it never looks one up either: a miss in the
    // connection table cost its mid-flow packets more than the rest of their path.
    let second_chance_mode = second_chance_mode();
    // Fast path: an established flow whose backend still serves this very VIP. A SYN opens a
    // new connection and is balanced afresh (Katran's rule): a reused 5-tuple (NAT gateways
    // cycle ports) never follows a stale entry to a backend that takes no new flows, and a
    // retransmitted SYN gets the same pick as long as the table is unchanged.
    if !flow.syn
        && !second_chance_mode
        && let Some((vip_id, id, backend)) = established_backend(&flow.key, &vip_key)
    {
        why.chose(trace_source::CONN_TABLE, id, backend);
        count(GlobalCounter::FlowHit);
        add(&VIP_STATS, vip_id, bytes);
        add(&BACKEND_STATS, id, bytes);
        return forward(ctx, &flow.l3, &flow.key, backend, Sent::Balanced);
    }

    let Some(vip) = VIPS.get_ptr(&vip_key) else {
        return (xdp_action::XDP_PASS, GlobalCounter::Passed);
    };
    // SAFETY: a hash value pointer stays valid for this program run (RCU).
    let vip = unsafe { *vip };
    add(&VIP_STATS, vip.id, bytes);
    count(GlobalCounter::FlowMiss);
    if vip.flags & vip_flags::SOURCE_RANGES != 0 && !source_admitted(&flow.key, vip.id) {
        return (xdp_action::XDP_DROP, GlobalCounter::DropSourceRange);
    }
    let Some((id, backend)) = pick_backend(&flow.key, &vip, why) else {
        return (xdp_action::XDP_DROP, GlobalCounter::DropNoBackend);
    };
    why.chose(trace_source::MAGLEV, id, backend);
    if second_chance_mode {
        why.flags |= trace_flags::NOT_RECORDED;
        if !flow.syn {
            match second_chance(ctx, flow, &vip, id, backend, why) {
                SecondChance::NotAsked => {}
                SecondChance::Kept => {
                    add(&BACKEND_STATS, id, bytes);
                    return (xdp_action::XDP_PASS, GlobalCounter::SecondChanceHit);
                }
                SecondChance::HandedOn(previous_id, previous) => {
                    add(&BACKEND_STATS, previous_id, bytes);
                    return hand_on(ctx, flow, previous);
                }
                SecondChance::Followed(to_id, to) => {
                    add(&BACKEND_STATS, to_id, bytes);
                    return follow_record(ctx, flow, to, Hop::First);
                }
            }
        }
    } else if !record_flow(&flow.key, vip.id, id, backend, flow.syn) {
        why.flags |= trace_flags::NOT_RECORDED;
    }
    add(&BACKEND_STATS, id, bytes);
    forward(ctx, &flow.l3, &flow.key, backend, Sent::Balanced)
}

/// A frame another node balanced (its source MAC is that peer's own, `PEERS`): by the current
/// table, so this node is its pick. In second-chance mode this node runs the check a first hop
/// that picks itself runs (`second_chance`), and the one for tables that disagree while a
/// change spreads (its own pick is another node); else and whatever the checks leave alone:
/// to its stack, unbalanced. No statistics: the first hop counted the packet for its VIP and
/// pick.
#[inline(always)]
fn first_hop_from_peer(ctx: &XdpContext, flow: &Flow, why: &mut Why) -> (u32, GlobalCounter) {
    let passed = (xdp_action::XDP_PASS, GlobalCounter::FromPeer);
    if flow.syn || flow.l3.first_fragment || !second_chance_mode() {
        return passed;
    }
    let Some(vip) = VIPS.get_ptr(&vip_key_of(&flow.key)) else {
        return passed;
    };
    // SAFETY: a hash value pointer stays valid for this program run (RCU).
    let vip = unsafe { *vip };
    let Some((id, backend)) = pick_backend(&flow.key, &vip, why) else {
        return passed;
    };
    why.chose(trace_source::MAGLEV, id, backend);
    why.flags |= trace_flags::FROM_PEER;
    // The sender's table picked this node, this node's picks another: the two tables disagree
    // for a moment (one agent applied a change before the other). The flow is this node's if
    // its conntrack knows it, else its own table's pick's (the sender's table is the newer:
    // this one still names the flow's node; or the older: this node is that node).
    if backend.mode != forward_mode::LOCAL {
        why.flags |= trace_flags::TABLES_DISAGREE;
        // A flow this node handed on at an earlier change goes where it went then. Nothing is
        // recorded in this window: which table is the newer is not known here.
        match handed::record_of(ctx, &flow.key, why) {
            Record::To(_, to) => return follow_record(ctx, flow, to, Hop::First),
            Record::Known => return (xdp_action::XDP_PASS, GlobalCounter::SecondChanceHit),
            Record::None => {}
        }
        why.flags |= trace_flags::CONNTRACK_ASKED;
        if conntrack::knows(ctx, &flow.key) {
            why.flags |= trace_flags::CONNTRACK_HIT;
            return (xdp_action::XDP_PASS, GlobalCounter::SecondChanceHit);
        }
        return hand_on(ctx, flow, backend);
    }
    // A VIP whose table has not changed (the common case) costs this node a pick.
    if vip.previous_table == NO_TABLE {
        return passed;
    }
    match second_chance(ctx, flow, &vip, id, backend, why) {
        SecondChance::NotAsked => passed,
        SecondChance::Kept => (xdp_action::XDP_PASS, GlobalCounter::SecondChanceHit),
        SecondChance::HandedOn(_, previous) => hand_on(ctx, flow, previous),
        SecondChance::Followed(_, to) => follow_record(ctx, flow, to, Hop::First),
    }
}

/// A frame another node handed on to this one (from its handed-on MAC): to this node's stack,
/// never balanced and never handed on by a table; unless this node handed the flow on itself
/// at an earlier change (a record in `HANDED_FLOWS`) and its conntrack does not know it: then
/// on to the node it went to, one hop fewer. That node is the next link of a chain that ends
/// at the flow's owner (docs/design.md, "Several changes").
#[inline(always)]
fn handed_on_frame(ctx: &XdpContext, flow: &Flow, why: &mut Why) -> (u32, GlobalCounter) {
    why.flags |= trace_flags::HANDED_ON;
    if !flow.syn
        && !flow.l3.first_fragment
        && let Record::To(_, to) = handed::record_of(ctx, &flow.key, why)
    {
        return follow_record(ctx, flow, to, Hop::Relay);
    }
    (xdp_action::XDP_PASS, GlobalCounter::FromPeer)
}

/// Which record hop a packet is at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// The first hand-on of a packet, by its pick (from a client or a first hop's frame):
    /// once per packet, so its bytes stay the client's (only the MACs change).
    First,
    /// A handed-on frame sent on again: records can form a cycle, so each such hop takes one
    /// off the IP TTL / hop limit.
    Relay,
}

/// Sends a packet on along this node's record (the node it handed the flow on to), marked
/// handed on; a relay one hop fewer, and at a hop limit of 1 (a cycle of records) to this
/// node's stack instead.
#[inline(always)]
fn follow_record(ctx: &XdpContext, flow: &Flow, to: &Backend, hop: Hop) -> (u32, GlobalCounter) {
    if hop == Hop::Relay && !handed::take_a_hop(ctx, flow) {
        return (xdp_action::XDP_PASS, GlobalCounter::SecondChanceHopLimit);
    }
    count(GlobalCounter::SecondChanceRecordFollowed);
    forward(ctx, &flow.l3, &flow.key, to, Sent::HandedOn)
}

/// Does this node run in second-chance mode (`Settings::flow_state`): no flow recorded or
/// looked up?
#[inline(always)]
fn second_chance_mode() -> bool {
    SETTINGS
        .get(0)
        .is_some_and(|s| s.flow_state == flow_state::SECOND_CHANCE)
}

/// What second chance decided for a non-SYN.
enum SecondChance {
    /// Not asked: as without it (no previous table, the same pick both times, or a pick of
    /// another node, which decides).
    NotAsked,
    /// This node's conntrack knows the flow: it is served here.
    Kept,
    /// Not known here: the flow began before the change on the previous table's pick.
    HandedOn(u32, &'static Backend),
    /// Handed on by this node at an earlier change (its record): to that node again.
    Followed(u32, &'static Backend),
}

/// Second chance (docs/design.md): a non-SYN that no entry knows, picked for THIS node by a
/// VIP table that changed. A flow this node handed on at an earlier change follows its record
/// (unless conntrack knows it now). Else, when the previous table picks another node, this
/// node keeps it if its own conntrack knows the flow, or hands it on to the previous pick
/// (`hand_on`) and records that.
#[inline(always)]
fn second_chance(
    ctx: &XdpContext,
    flow: &Flow,
    vip: &VipInfo,
    id: u32,
    backend: &Backend,
    why: &mut Why,
) -> SecondChance {
    if backend.mode != forward_mode::LOCAL || vip.previous_table == NO_TABLE {
        return SecondChance::NotAsked;
    }
    // Before the previous table: this node may be the pick again (or still), and the flow
    // one it handed on at an earlier change.
    match handed::record_of(ctx, &flow.key, why) {
        Record::To(to_id, to) => return SecondChance::Followed(to_id, to),
        Record::Known => return SecondChance::Kept,
        Record::None => {}
    }
    let Some((previous_id, previous)) = previous_pick(&flow.key, vip) else {
        return SecondChance::NotAsked;
    };
    if previous_id == id || previous.mode == forward_mode::LOCAL {
        return SecondChance::NotAsked;
    }
    why.flags |= trace_flags::CONNTRACK_ASKED;
    if conntrack::knows(ctx, &flow.key) {
        why.flags |= trace_flags::CONNTRACK_HIT;
        return SecondChance::Kept;
    }
    why.chose(trace_source::PREVIOUS_TABLE, previous_id, previous);
    handed::record(&flow.key, vip.id, previous_id, previous);
    SecondChance::HandedOn(previous_id, previous)
}

/// Sends a packet second chance did not keep to the previous table's pick, marked as handed
/// on (`Sent::HandedOn`): the receiver passes it to its stack, or follows its own record of
/// the flow; no table hands it on again.
#[inline(always)]
fn hand_on(ctx: &XdpContext, flow: &Flow, previous: &Backend) -> (u32, GlobalCounter) {
    count(GlobalCounter::SecondChanceHandedOn);
    forward(ctx, &flow.l3, &flow.key, previous, Sent::HandedOn)
}

/// The pick the VIP's previous table gives the flow (its own size: tables differ in size).
#[inline(always)]
fn previous_pick(key: &FlowKey, vip: &VipInfo) -> Option<(u32, &'static Backend)> {
    let size = TABLES.get(vip.previous_table)?.size;
    if size == 0 {
        return None;
    }
    let affinity = vip.flags & vip_flags::AFFINITY != 0;
    pick_in(vip.previous_table, key.hash(affinity) % size)
}

/// Was the frame sent by another sluice node, and as what (`peer_frame`: balanced there, or
/// handed on)? `None`: not a peer's frame.
#[inline(always)]
fn peer_frame(ctx: &XdpContext) -> Option<u8> {
    // The frame's bounds are read afresh (volatile): LLVM would otherwise reuse what it proved
    // while parsing and drop the check, which the verifier needs on this new pointer.
    // SAFETY: `ctx.ctx` is the program's context, valid for this run.
    let (data, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if data + ETH_HLEN > end {
        return None;
    }
    // SAFETY: the Ethernet header lies within the frame, checked above.
    let src = unsafe { (*(data as *const EthHdr)).src };
    if !PEER_FILTER.get(0).is_some_and(|f| f.may_contain(&src)) {
        return None;
    }
    // SAFETY: a hash value pointer stays valid for this program run (RCU).
    PEERS
        .get_ptr(&PeerKey::new(src))
        .map(|kind| unsafe { *kind })
}

#[inline(always)]
fn vip_key_of(key: &FlowKey) -> VipKey {
    VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    }
}

/// Is this address (a `VIP_ADDRS` key) a VIP address? The one-bit filter first, so that
/// non-VIP traffic costs no hash lookup.
#[inline(always)]
fn vip_addressed(key: &VipKey) -> bool {
    VIP_FILTER.get(0).is_some_and(|f| f.may_contain(&key.addr)) && VIP_ADDRS.get_ptr(key).is_some()
}

/// Is the packet's destination a VIP address (any port)? (The filter already passed it.)
#[inline(always)]
fn is_vip_address(l3: &L3) -> bool {
    VIP_ADDRS.get_ptr(&l3.dst_key()).is_some()
}

/// Is the client inside one of the VIP's source ranges (of its own family)?
#[inline(always)]
fn source_admitted(key: &FlowKey, vip_id: u32) -> bool {
    let bits = if key.family == FAMILY_V4 { 32 } else { 128 };
    // SAFETY: [u32; 4] and [u8; 16] have the same size; bytes keep the packet's order.
    let addr: [u8; 16] = unsafe { core::mem::transmute(key.src) };
    let lookup = Key::new(
        ScopedAddr::prefix_len(bits),
        ScopedAddr {
            scope_be: source_range_scope(vip_id, key.family).to_be(),
            addr,
        },
    );
    SOURCE_RANGES.get(&lookup).is_some()
}

/// The connection table's VIP id and backend for this flow, if both still hold: the entry's
/// VIP id still names this flow's VIP (`VIP_BY_ID`), the backend is still a member (active or
/// draining) of that VIP's table, and its entry still holds the backend the flow was recorded
/// with (its generation). Otherwise the flow takes the slow path and re-hashes (or passes, if
/// its VIP is gone). Array reads only: no `VIPS` lookup on this path.
#[inline(always)]
fn established_backend(key: &FlowKey, vip_key: &VipKey) -> Option<(u32, u32, &'static Backend)> {
    let entry = if key.family == FAMILY_V4 {
        FLOWS.get_ptr(&key.narrow())?
    } else {
        FLOWS6.get_ptr(key)?
    };
    // SAFETY: read once, by value; a concurrent LRU eviction only makes it stale.
    let FlowValue {
        backend: id,
        vip: vip_id,
        generation,
    } = unsafe { *entry };
    let (id, vip_id) = (u32::from(id), u32::from(vip_id));
    // Array values live as long as their maps; they are read in place, not copied.
    let vip = VIP_BY_ID.get(vip_id)?;
    if vip.key != *vip_key || !TABLES.get(vip.table)?.has(id) {
        return None;
    }
    let backend = BACKENDS.get(id)?;
    (backend.state != backend_state::EMPTY && backend.generation == generation)
        .then_some((vip_id, id, backend))
}

/// The Maglev pick for the flow: the backend every node's table gives it.
#[inline(always)]
fn pick_backend(key: &FlowKey, vip: &VipInfo, why: &mut Why) -> Option<(u32, &'static Backend)> {
    if vip.live_backends == 0 || vip.table_size == 0 {
        return None;
    }
    let affinity = vip.flags & vip_flags::AFFINITY != 0;
    let slot = key.hash(affinity) % vip.table_size;
    why.slot = slot;
    why.table_size = vip.table_size;
    if affinity {
        why.flags |= trace_flags::AFFINITY;
    }
    pick_in(vip.table, slot)
}

/// Table `table`'s backend at `slot`, if any and in use.
#[inline(always)]
fn pick_in(table: u32, slot: u32) -> Option<(u32, &'static Backend)> {
    // Two slots per element (`MAGLEV_SLOTS_PER_ELEMENT`): the even one in the low half.
    let pair = *MAGLEV.get_value(table, &(slot / 2))?;
    let id = (pair >> ((slot & 1) * 32)) as u32;
    if id == NO_BACKEND {
        return None;
    }
    // A table's picks are its active members, fixed while any VIP points at it; a backend's
    // entry is freed only once no table has it.
    let backend = BACKENDS.get(id)?;
    (backend.state != backend_state::EMPTY).then_some((id, backend))
}

/// Records a new flow's pick in the connection table, unless the flood guard holds this CPU
/// over its rate of new flows: then the flow rides on Maglev's consistent pick alone (the same
/// backend while the table is unchanged), and a SYN's stale entry, if any, is removed so that
/// the connection's later packets follow the SYN and not the entry. False when not recorded.
#[inline(always)]
fn record_flow(key: &FlowKey, vip_id: u32, id: u32, backend: &Backend, syn: bool) -> bool {
    if !new_flow_admitted() {
        count(GlobalCounter::FlowsNotRecorded);
        // A lookup first: it takes no lock, a removal does, and a forged SYN has no entry.
        if syn {
            let _ = if key.family == FAMILY_V4 {
                let key = key.narrow();
                FLOWS.get_ptr(&key).map(|_| FLOWS.remove(&key))
            } else {
                FLOWS6.get_ptr(key).map(|_| FLOWS6.remove(key))
            };
        }
        return false;
    }
    // Ids fit 16 bits (`MAX_BACKENDS`, `MAX_VIPS`: checked in lb-common).
    let value = FlowValue {
        backend: id as u16,
        vip: vip_id as u16,
        generation: backend.generation,
    };
    // A full table evicts its least recently used entry; insert fails only on memory
    // pressure, and then the flow is still forwarded (Maglev picks the same backend).
    let _ = if key.family == FAMILY_V4 {
        FLOWS.insert(&key.narrow(), &value, 0)
    } else {
        FLOWS6.insert(key, &value, 0)
    };
    true
}

/// What a packet `forward` sends on is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sent {
    /// A packet balanced here (a flow's packet).
    Balanced,
    /// An ICMP error about a flow: never answered with one.
    IcmpError,
    /// Handed on by second chance: in L2 mode it leaves from this node's MAC's twin
    /// (`handed_on_mac`), which the receiver's `PEERS` knows as `peer_frame::HANDED_ON`.
    /// Encapsulated, it needs no mark: a node never balances what it unwraps.
    HandedOn,
}

/// Sends the packet on to `backend`: L2 rewrite or encapsulation, then out. A packet too big to
/// encapsulate is answered with ICMP "too big", except an ICMP error (dropped).
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    l3: &L3,
    key: &FlowKey,
    backend: &Backend,
    sent: Sent,
) -> (u32, GlobalCounter) {
    if backend.mode == forward_mode::LOCAL {
        return (xdp_action::XDP_PASS, GlobalCounter::Local);
    }
    if backend.mode != forward_mode::L2 {
        let outer_v4 = backend.mode == forward_mode::IPIP_V4;
        let overhead = if outer_v4 {
            IPIP_OVERHEAD
        } else {
            IP6IP6_OVERHEAD
        };
        let mtu = backend.mtu as u32;
        if mtu != 0 && l3.len as u32 + overhead > mtu {
            if sent == Sent::IcmpError {
                return (xdp_action::XDP_DROP, GlobalCounter::DropTooBig);
            }
            return too_big(ctx, l3, mtu - overhead);
        }
        if encapsulate(ctx, l3, key, backend, outer_v4).is_none() {
            return (xdp_action::XDP_DROP, GlobalCounter::DropInternal);
        }
    }
    let Some(eth) = packet::ptr_at_mut::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_DROP, GlobalCounter::DropMalformed);
    };
    let src = if sent == Sent::HandedOn && backend.mode == forward_mode::L2 {
        handed_on_mac(backend.src_mac)
    } else {
        backend.src_mac
    };
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe {
        (*eth).dst = backend.dst_mac;
        (*eth).src = src;
    }
    if backend.ifindex == ctx.ingress_ifindex() as u32 {
        return (xdp_action::XDP_TX, GlobalCounter::Tx);
    }
    match TX_PORTS.redirect(backend.ifindex, 0) {
        Ok(action) => (action, GlobalCounter::Redirected),
        Err(_) => (xdp_action::XDP_DROP, GlobalCounter::DropInternal),
    }
}

/// An ICMP error about a VIP flow (a router could not deliver a backend's reply, or asks for
/// a smaller MTU): hand it to the backend that owns the flow, so its TCP stack hears it.
#[inline(always)]
fn icmp_error(ctx: &XdpContext, flow: &Flow, why: &mut Why) -> (u32, GlobalCounter) {
    // The quoted packet was sent from the VIP the error is addressed to; an error whose quote
    // names another address is not about a flow of this VIP (forged, or not ours at all).
    if flow.key.dst != flow.l3.dst {
        return if is_vip_address(&flow.l3) {
            (xdp_action::XDP_DROP, GlobalCounter::DropIcmpMismatch)
        } else {
            (xdp_action::XDP_PASS, GlobalCounter::Passed)
        };
    }
    let vip_key = vip_key_of(&flow.key);
    let backend = match established_backend(&flow.key, &vip_key) {
        Some((_, id, backend)) => {
            why.chose(trace_source::CONN_TABLE, id, backend);
            backend
        }
        None => {
            let Some(vip) = VIPS.get_ptr(&vip_key) else {
                return (xdp_action::XDP_PASS, GlobalCounter::Passed);
            };
            // SAFETY: a hash value pointer stays valid for this program run (RCU).
            let vip = unsafe { *vip };
            // Not in the table (another load balancer took the flow): Maglev picks the
            // backend every load balancer would.
            match pick_backend(&flow.key, &vip, why) {
                Some((id, backend)) => {
                    why.chose(trace_source::MAGLEV, id, backend);
                    backend
                }
                None => return (xdp_action::XDP_DROP, GlobalCounter::DropNoBackend),
            }
        }
    };
    match forward(ctx, &flow.l3, &flow.key, backend, Sent::IcmpError) {
        (xdp_action::XDP_DROP, reason) => (xdp_action::XDP_DROP, reason),
        (action, _) => (action, GlobalCounter::IcmpErrorForwarded),
    }
}

#[inline(always)]
fn count(counter: GlobalCounter) {
    if let Some(value) = GLOBAL_STATS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
fn add<const N: usize>(stats: &PerCpuArray<Counters, N>, index: u32, bytes: u64) {
    if let Some(counters) = stats.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no other writer on this CPU while we run.
        unsafe {
            (*counters).packets += 1;
            (*counters).bytes += bytes;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel reads this section: "Dual MIT/GPL" is on its list of GPL-compatible strings, so
// every helper stays open to the program, GPL-only ones included (e.g. aya-log's perf output).
// The code is MIT OR GPL-2.0 (lb-ebpf/Cargo.toml, LICENSE-MIT, LICENSE-GPL2).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
