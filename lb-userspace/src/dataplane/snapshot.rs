//! What the maps hold, read in one pass: the dataplane's typed snapshot that the reconcile plans
//! against and the readers (`inspect`, `metrics`) show, so none of them reads raw maps.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::Context as _;
use lb_common::{
    Backend, MemberWeight, ScopedAddr, TableInfo, VipInfo, VipKey, VipRef, addr_from_raw,
    backend_state,
};

use super::Maps;

/// A `SOURCE_RANGES` entry: (prefix length, scoped address).
pub type RangeKey = (u32, ScopedAddr);

/// The maps' view of the world: VIPs by key, occupied backend entries by id, the tables the
/// VIPs point at, VIP addresses and source ranges; for a reconcile also the generation of every
/// backend entry and the `VIP_BY_ID` entries that hold a key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub vips: BTreeMap<VipKey, VipInfo>,
    pub backends: BTreeMap<u32, Backend>,
    pub vip_addrs: BTreeMap<VipKey, u32>,
    pub source_ranges: BTreeSet<RangeKey>,
    /// The tables some VIP points at, by id, as `TABLES` describes them (complete ones only:
    /// an interrupted install has no fingerprint and is not here).
    pub tables: BTreeMap<u32, TableInfo>,
    /// Of the same tables: what their picks are a function of
    /// ([`table_picks`], from `TABLE_MEMBERS`). Two tables with the same send every flow to
    /// the same backend (they differ at most in draining members).
    pub(crate) picks: BTreeMap<u32, u64>,
    /// The generation of every backend entry that ever held a backend, empty ones included.
    pub(crate) generations: BTreeMap<u32, u32>,
    /// `VIP_BY_ID` entries with a key, by VIP id.
    pub(crate) vip_refs: BTreeMap<u32, VipRef>,
}

impl Snapshot {
    pub fn read(maps: &Maps) -> anyhow::Result<Self> {
        let mut current = Self {
            vips: maps.read_vips()?,
            ..Self::default()
        };
        for (id, value) in maps.read_backends()?.into_iter().enumerate() {
            current.add_backend(id as u32, value);
        }
        let empty = VipRef::default();
        for (id, value) in maps.read_vip_refs()?.into_iter().enumerate() {
            if value != empty {
                current.vip_refs.insert(id as u32, value);
            }
        }
        // Their previous tables too: kept whole while a VIP names one (second chance).
        let in_use: BTreeSet<u32> = current
            .vips
            .values()
            .flat_map(|i| [i.table, i.previous_table])
            .filter(|t| *t != lb_common::NO_TABLE)
            .collect();
        for id in in_use {
            if let Some(info) = maps.table(id)? {
                current.tables.insert(id, info);
            }
        }
        // A VIP that moves back to its previous table makes it current again.
        for (id, info) in &current.tables {
            let mut members = Vec::new();
            for backend in member_ids(info) {
                if let Some(weight) = maps.member_weight(*id, backend)? {
                    members.push((backend, weight));
                }
            }
            current.picks.insert(*id, table_picks(members, info.size));
        }
        current.vip_addrs = maps.read_vip_addrs()?;
        for key in maps.source_ranges.keys() {
            let key = key.context("reading the SOURCE_RANGES map")?;
            current.source_ranges.insert((key.prefix_len(), key.data()));
        }
        Ok(current)
    }

    pub(crate) fn add_backend(&mut self, id: u32, value: Backend) {
        if value.generation != 0 {
            self.generations.insert(id, value.generation);
        }
        if value.state != backend_state::EMPTY {
            self.backends.insert(id, value);
        }
    }

    /// Backend `id`'s address, if the entry is occupied.
    pub fn backend_addr(&self, id: u32) -> Option<IpAddr> {
        self.backends
            .get(&id)
            .map(|b| addr_from_raw(&b.addr, b.family))
    }
}

/// The backend ids of a table's members, in order (its set bits: a word at a time, not a
/// test per possible id).
fn member_ids(info: &TableInfo) -> impl Iterator<Item = u32> + '_ {
    info.bits.iter().enumerate().flat_map(|(word, bits)| {
        let mut rest = *bits;
        std::iter::from_fn(move || {
            (rest != 0).then(|| {
                let bit = rest.trailing_zeros();
                rest &= rest - 1;
                word as u32 * 64 + bit
            })
        })
    })
}

/// What a table's picks are a function of: its size and, in backend id order, each member
/// that takes new flows with its weight (draining members have no slot).
pub fn table_picks(members: impl IntoIterator<Item = (u32, MemberWeight)>, size: u32) -> u64 {
    let picking = members
        .into_iter()
        .map(|(backend, weight)| (backend, lb_common::member_pick_weight(weight)))
        .filter(|(_, weight)| *weight > 0);
    fnv1a(
        std::iter::once(u64::from(size))
            .chain(picking.map(|(backend, weight)| u64::from(backend) << 32 | u64::from(weight))),
    )
}

/// FNV-1a over the little-endian bytes of `words` (the tables' fingerprints).
pub fn fnv1a(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for word in words {
        for byte in word.to_le_bytes() {
            h = (h ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// One backend of a VIP as the readers show it: its entry, and its weight in the VIP's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Member {
    pub id: u32,
    pub backend: Backend,
    /// The weight as configured (kept while draining).
    pub weight: u32,
    pub draining: bool,
}

impl Member {
    /// The weight that counts in the Maglev table: 0 while draining.
    pub fn effective_weight(&self) -> u32 {
        lb_common::member_pick_weight(
            self.weight
                | if self.draining {
                    lb_common::MEMBER_DRAINING
                } else {
                    0
                },
        )
    }

    pub fn addr(&self) -> IpAddr {
        addr_from_raw(&self.backend.addr, self.backend.family)
    }
}

/// Every table's members (`TABLE_MEMBERS` joined with `BACKENDS`), by table id, in backend id
/// order: the order the control plane builds the table from.
pub fn members_by_table(
    maps: &Maps,
    backends: &BTreeMap<u32, Backend>,
) -> anyhow::Result<BTreeMap<u32, Vec<Member>>> {
    Ok(maps
        .table_members()?
        .into_iter()
        .map(|(table, members)| {
            let members = members
                .into_iter()
                .filter_map(|(id, weight)| Some(member(id, *backends.get(&id)?, weight)))
                .collect();
            (table, members)
        })
        .collect())
}

pub(crate) fn member(id: u32, backend: Backend, weight: MemberWeight) -> Member {
    Member {
        id,
        backend,
        weight: weight & !lb_common::MEMBER_DRAINING,
        draining: weight & lb_common::MEMBER_DRAINING != 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_are_the_set_bits_in_order() {
        let mut info = TableInfo::default();
        for id in [0, 5, 63, 64, 700, lb_common::MAX_BACKENDS - 1] {
            info.add(id);
        }
        assert_eq!(
            member_ids(&info).collect::<Vec<_>>(),
            vec![0, 5, 63, 64, 700, lb_common::MAX_BACKENDS - 1]
        );
        assert_eq!(member_ids(&TableInfo::default()).count(), 0);
    }
}
