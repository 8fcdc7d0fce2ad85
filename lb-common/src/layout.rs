//! The maps' layout as an ABI between two compilers: pinned sizes and the fingerprint that
//! keeps a program from adopting maps pinned by an incompatible one.

use crate::{
    Announce, Backend, Counters, FLOW_HASH_SEED, FlowKey, FlowKey4, FlowValue, GlobalCounter,
    HANDED_FLOWS_SIZE, MAX_BACKENDS, MAX_DECAP_ADDRS, MAX_PEERS, MAX_SOURCE_RANGES,
    MAX_TABLE_MEMBERS, MAX_TABLES, MAX_TX_PORTS, MAX_VIPS, MemberKey, PeerFilter, PeerKey,
    RateWindow, ScopedAddr, Settings, TableInfo, TraceEvent, TraceFilter, VipFilter, VipInfo,
    VipKey, VipRef, hash_finish, hash_round, map_names,
};

// The layouts are an ABI between two compilers: pin them.
const _: () = assert!(size_of::<VipKey>() == 20);
const _: () = assert!(size_of::<VipInfo>() == 24);
const _: () = assert!(size_of::<VipRef>() == 24);
const _: () = assert!(size_of::<TableInfo>() == 16 + MAX_BACKENDS as usize / 8);
const _: () = assert!(size_of::<MemberKey>() == 8);
const _: () = assert!(size_of::<Backend>() == 64);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<FlowKey4>() == 16);
const _: () = assert!(size_of::<ScopedAddr>() == 20);
const _: () = assert!(size_of::<FlowValue>() == 8);
const _: () = assert!(size_of::<Settings>() == 8);
const _: () = assert!(size_of::<RateWindow>() == 16);
const _: () = assert!(size_of::<Counters>() == 16);
const _: () = assert!(size_of::<TraceFilter>() == 80);
const _: () = assert!(size_of::<TraceEvent>() == 80);
const _: () = assert!(size_of::<VipFilter>() == 512);
const _: () = assert!(size_of::<Announce>() == 8);
const _: () = assert!(size_of::<PeerKey>() == 8);
const _: () = assert!(size_of::<PeerFilter>() == 64);

/// Bump when a map's meaning changes without its sizes changing (e.g. a key's field order).
/// 3: `FlowValue` carries the slot's generation; `SOURCE_RANGES` scopes carry the family.
/// 4: `SETTINGS` and `NEW_FLOWS` (the flood guard).
/// 5: Maglev tables hold two slots per 8-byte element.
/// 6: `TRACE`, `TRACE_EVENTS`, `TRACE_RATE` (`sluice trace`).
/// 7: backends shared by all VIPs, Maglev tables by content (`VIP_BY_ID`, `TABLES`,
///    `TABLE_MEMBERS`); `FlowValue` names the VIP.
/// 8: `VipInfo::previous_table`, `Settings::flow_state` (second chance).
/// 9: `HANDED_FLOWS` (second chance over several changes), `CT_SCRATCH` holds its value.
const MAP_LAYOUT_REVISION: u32 = 9;

/// Fingerprint of everything a pinned map's contents depend on: struct sizes, limits, counter
/// slots. A program whose fingerprint differs must not adopt maps pinned by another: it would
/// misread them. Kept beside the pins (see `PinLayout`), compared before adopting.
pub const MAP_LAYOUT: u32 = {
    let parts = [
        MAP_LAYOUT_REVISION,
        size_of::<VipKey>() as u32,
        size_of::<VipInfo>() as u32,
        size_of::<Backend>() as u32,
        size_of::<VipRef>() as u32,
        size_of::<TableInfo>() as u32,
        size_of::<MemberKey>() as u32,
        size_of::<FlowKey>() as u32,
        size_of::<FlowKey4>() as u32,
        size_of::<FlowValue>() as u32,
        size_of::<Counters>() as u32,
        size_of::<VipFilter>() as u32,
        size_of::<ScopedAddr>() as u32,
        size_of::<Announce>() as u32,
        size_of::<PeerKey>() as u32,
        size_of::<PeerFilter>() as u32,
        size_of::<Settings>() as u32,
        size_of::<RateWindow>() as u32,
        size_of::<TraceFilter>() as u32,
        size_of::<TraceEvent>() as u32,
        MAX_PEERS,
        MAX_DECAP_ADDRS,
        GlobalCounter::COUNT,
        MAX_VIPS,
        MAX_BACKENDS,
        MAX_TABLES,
        MAX_TABLE_MEMBERS,
        MAX_SOURCE_RANGES,
        MAX_TX_PORTS,
        HANDED_FLOWS_SIZE,
        map_names::ALL.len() as u32,
    ];
    let mut h = FLOW_HASH_SEED;
    let mut i = 0;
    while i < parts.len() {
        h = hash_round(h, parts[i]);
        i += 1;
    }
    hash_finish(h)
};
