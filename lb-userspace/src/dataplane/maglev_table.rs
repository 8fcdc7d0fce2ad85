//! Maglev tables as inner maps: built through mmap in one copy, swapped into the outer array
//! in batches (the one atomic step packets can observe), read back with their fingerprint.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::ptr;

use anyhow::{Context as _, anyhow, bail};
use aya::maps::MapData;
use lb_common::{MAGLEV_INNER_FLAGS, MemberKey, MemberWeight, NO_BACKEND, TableInfo};

use super::maps::Maps;
use super::sys::update_batch;

/// One table for [`install_maglev_tables`]: slot i holds `backends[picks[i]]`, or `NO_BACKEND`
/// where `picks[i]` names no backend. Tables with the same weights share `picks` (a Maglev table
/// of indices), so no copy of a table is held in memory per table id.
pub struct TableWrite<'a> {
    pub table: u32,
    pub picks: &'a [u32],
    pub backends: &'a [u32],
    /// What `TABLES` says of it (fingerprint, size, member bits).
    pub info: TableInfo,
    /// Every member with its weight, for `TABLE_MEMBERS`.
    pub members: &'a [(u32, MemberWeight)],
}

/// Elements of the inner array of a table of `slots` slots.
pub(super) fn inner_elements(slots: u32) -> u32 {
    lb_common::maglev_elements(slots)
}

/// Tables per batched update: bounds the descriptors held open at once (inner maps) well below
/// the usual 1024 limit.
pub(super) const TABLE_BATCH: usize = 256;

/// Installs tables at free ids (no VIP points at them yet): for each, its description and
/// members without a fingerprint (so that an interrupted install is never taken for a complete
/// table), then its Maglev picks (filled through mmap in one copy) swapped into the outer slot,
/// then the fingerprint. The kernel waits for an RCU grace period after each update of an outer
/// map, ~14 ms here: one wait per batch of [`TABLE_BATCH`] tables instead of one per table.
pub fn install_maglev_tables(maps: &mut Maps, tables: &[TableWrite<'_>]) -> anyhow::Result<()> {
    for chunk in tables.chunks(TABLE_BATCH) {
        let mut inners = Vec::with_capacity(chunk.len());
        for t in chunk {
            forget_members(maps, t.table)?;
            let unfinished = TableInfo {
                fingerprint: 0,
                ..t.info
            };
            maps.write_table_info(t.table, &unfinished)?;
            for (backend, weight) in t.members {
                let key = MemberKey {
                    table: t.table,
                    backend: *backend,
                };
                maps.write_member(&key, *weight)?;
            }
            let size = u32::try_from(t.picks.len()).context("Maglev table too large")?;
            let inner = new_maglev_table(inner_elements(size))
                .with_context(|| format!("building Maglev table #{}", t.table))?;
            let mut mapping = MaglevMapping::new(&inner, size, libc::PROT_READ | libc::PROT_WRITE)?;
            mapping.write_picks(t.picks, t.backends);
            drop(mapping);
            inners.push(inner);
        }
        swap_in(maps, chunk.iter().map(|t| t.table), &inners)?;
        for t in chunk {
            maps.write_table_info(t.table, &t.info)?;
        }
    }
    Ok(())
}

/// Releases tables no VIP points at any more: their description and members go, and a
/// one-slot empty table stands in at their ids until reused (freeing the picks' memory).
pub fn free_maglev_tables(maps: &mut Maps, tables: &[u32]) -> anyhow::Result<()> {
    for chunk in tables.chunks(TABLE_BATCH) {
        let mut inners = Vec::with_capacity(chunk.len());
        for id in chunk {
            forget_members(maps, *id)?;
            maps.write_table_info(*id, &TableInfo::default())?;
            let inner = new_maglev_table(1)?;
            let mut mapping = MaglevMapping::new(&inner, 1, libc::PROT_READ | libc::PROT_WRITE)?;
            mapping.write_picks(&[NO_BACKEND], &[]);
            drop(mapping);
            inners.push(inner);
        }
        swap_in(maps, chunk.iter().copied(), &inners)?;
    }
    Ok(())
}

/// Removes the `TABLE_MEMBERS` entries of table `id`, as its bits in `TABLES` list them (an
/// interrupted install writes the bits before the members, so none is missed).
fn forget_members(maps: &mut Maps, id: u32) -> anyhow::Result<()> {
    let Some(old) = maps.table_bits(id)? else {
        return Ok(());
    };
    for backend in 0..lb_common::MAX_BACKENDS {
        if old.has(backend) {
            maps.remove_member(&MemberKey { table: id, backend })?;
        }
    }
    Ok(())
}

/// Points the outer `MAGLEV` slots `ids` at `inners`: one batched update, or one at a time on a
/// kernel without batched updates of this map type. Each slot's swap is atomic.
fn swap_in(
    maps: &mut Maps,
    ids: impl Iterator<Item = u32>,
    inners: &[MapData],
) -> anyhow::Result<()> {
    let keys: Vec<u32> = ids.collect();
    let fds: Vec<u32> = inners
        .iter()
        .map(|m| m.fd().as_fd().as_raw_fd() as u32)
        .collect();
    if keys.len() > 1 && update_batch(&maps.maglev_fd, &keys, &fds).is_ok() {
        return Ok(());
    }
    for (id, inner) in keys.iter().zip(inners) {
        maps.maglev
            .set(*id, inner, 0)
            .map_err(|e| anyhow!("swapping in Maglev table #{id}: {e}"))?;
    }
    Ok(())
}

pub(super) fn new_maglev_table(elements: u32) -> anyhow::Result<MapData> {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        8,
        elements,
        MAGLEV_INNER_FLAGS,
    );
    MapData::create(obj, "sluice_maglev", None)
        .map_err(|e| anyhow!("creating a Maglev table of {elements} elements: {e}"))
}

/// An mmap of a Maglev inner array (`BPF_F_MMAPABLE`): its 8-byte elements hold two 4-byte
/// slots each (`lb_common::MAGLEV_SLOTS_PER_ELEMENT`), so the slots are a plain `u32` array in
/// the mapping.
pub(super) struct MaglevMapping {
    addr: *mut libc::c_void,
    len: usize,
    /// Table slots.
    slots: usize,
}

/// Bytes per element of an array map's value area.
pub(super) const ARRAY_STRIDE: usize = 8;

impl MaglevMapping {
    /// Maps the value area of `map`, the inner array of a table of `slots` slots.
    pub(super) fn new(map: &MapData, slots: u32, prot: libc::c_int) -> anyhow::Result<Self> {
        let elements = inner_elements(slots) as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (elements * ARRAY_STRIDE).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's value area, of the map's rounded size.
        let addr = unsafe { libc::mmap(ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if addr == libc::MAP_FAILED {
            bail!(
                "mmap of a Maglev table: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self {
            addr,
            len,
            slots: slots as usize,
        })
    }

    fn slots(&self) -> &[u32] {
        // SAFETY: the mapping holds the table's elements (two slots each) and lives as long as
        // self; page-aligned, so aligned for u32.
        unsafe { std::slice::from_raw_parts(self.addr as *const u32, self.slots) }
    }

    pub(super) fn read(&self) -> Vec<u32> {
        self.slots().to_vec()
    }

    /// Slot i := backends[picks[i]], or NO_BACKEND.
    pub(super) fn write_picks(&mut self, picks: &[u32], backends: &[u32]) {
        // SAFETY: as in `slots`, mapped writable by `new` when called with PROT_WRITE.
        let slots = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u32, self.slots) };
        for (slot, pick) in slots.iter_mut().zip(picks) {
            *slot = backends
                .get(*pick as usize)
                .copied()
                .unwrap_or(lb_common::NO_BACKEND);
        }
    }
}

impl Drop for MaglevMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
