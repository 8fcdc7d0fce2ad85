//! What the maps hold, read in one pass: the dataplane's typed snapshot that the reconcile plans
//! against and the readers (`inspect`, `metrics`) show, so none of them reads raw maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Context as _;
use lb_common::{Backend as SlotValue, ScopedAddr, VipInfo, VipKey, addr_from_raw, backend_state};

use super::Maps;

/// A `SOURCE_RANGES` entry: (prefix length, scoped address).
pub type RangeKey = (u32, ScopedAddr);

/// The maps' view of the world: VIPs by key, occupied backend slots by id, VIP addresses and
/// source ranges; for a reconcile also the fingerprint of each VIP's installed Maglev table and
/// the generation of every slot.
#[derive(Default)]
pub struct Snapshot {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub slots: BTreeMap<u32, SlotValue>,
    pub vip_addrs: BTreeMap<VipKey, u32>,
    pub source_ranges: BTreeSet<RangeKey>,
    /// The occupied slots of each VIP id, by backend address (so that a plan over N VIPs reads
    /// each VIP's slots directly instead of scanning all of them N times).
    pub(crate) by_vip: BTreeMap<u32, BTreeMap<IpAddr, (u32, SlotValue)>>,
    /// The generation of every slot that ever held a backend, empty ones included.
    pub(crate) generations: BTreeMap<u32, u32>,
    /// The fingerprint stored beside each VIP's installed table, by VIP id (none: no table, or
    /// one without it). Filled by [`Snapshot::read_tables`].
    pub(crate) tables: BTreeMap<u32, u64>,
}

impl Snapshot {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        let mut current = Self {
            vips: maps.read_vips()?,
            ..Self::default()
        };
        for (id, value) in maps.read_backends()?.into_iter().enumerate() {
            current.add_slot(id as u32, value);
        }
        for entry in maps.vip_addrs.iter() {
            let (key, count) = entry.context("reading the VIP_ADDRS map")?;
            current.vip_addrs.insert(key, count);
        }
        for key in maps.source_ranges.keys() {
            let key = key.context("reading the SOURCE_RANGES map")?;
            current.source_ranges.insert((key.prefix_len(), key.data()));
        }
        Ok(current)
    }

    /// Reads the fingerprint of every VIP's installed Maglev table: whether a table must be
    /// rebuilt is decided from what is installed, not from slot values (which an interrupted
    /// reconcile may have written without the table that goes with them).
    pub fn read_tables(&mut self, maps: &Maps) {
        for info in self.vips.values() {
            if let Some(fingerprint) = maps.maglev_fingerprint(info.id, info.table_size) {
                self.tables.insert(info.id, fingerprint);
            }
        }
    }

    pub(crate) fn add_slot(&mut self, id: u32, value: SlotValue) {
        if value.generation != 0 {
            self.generations.insert(id, value.generation);
        }
        if value.state != backend_state::EMPTY {
            self.slots.insert(id, value);
            self.by_vip
                .entry(value.vip_id)
                .or_default()
                .insert(addr_from_raw(&value.addr, value.family), (id, value));
        }
    }

    /// The occupied slots of VIP `vip_id`, by backend address.
    pub(crate) fn slots_of(&self, vip_id: u32) -> BTreeMap<IpAddr, (u32, SlotValue)> {
        self.by_vip.get(&vip_id).cloned().unwrap_or_default()
    }
}
