//! Maglev tables as inner maps: built through mmap in one copy, swapped into the outer array
//! in batches (the one atomic step packets can observe), read back with their fingerprint.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::ptr;

use anyhow::{Context as _, anyhow, bail};
use aya::maps::MapData;
use lb_common::MAGLEV_INNER_FLAGS;

use super::maps::Maps;
use super::sys::update_batch;

/// One VIP's table for [`install_maglev_tables`]: slot i holds `backends[picks[i]]`, or
/// `NO_BACKEND` where `picks[i]` names no backend. VIPs with the same backends and weights share
/// `picks` (a Maglev table of indices), so no per-VIP copy of a table is ever held in memory.
pub struct TableWrite<'a> {
    pub vip_id: u32,
    pub picks: &'a [u32],
    pub backends: &'a [u32],
    /// Of what the table is built from (see [`Maps::maglev_fingerprint`]).
    pub fingerprint: u64,
}

/// Elements after a Maglev table's slots, holding the fingerprint of what the table was built
/// from. Written into the new inner map before it is swapped in, so it always describes the
/// table that is installed, whatever happened to a reconcile since. The program never reads it
/// (it picks a slot modulo the VIP's table size).
pub const FINGERPRINT_ELEMENTS: u32 = 1;

/// Elements of the inner array of a table of `slots` slots, with its fingerprint.
pub(super) fn inner_elements(slots: u32) -> Option<u32> {
    lb_common::maglev_elements(slots).checked_add(FINGERPRINT_ELEMENTS)
}

/// VIPs per batched update: bounds the descriptors held open at once (inner maps) well below
/// the usual 1024 limit.
pub(super) const TABLE_BATCH: usize = 256;

/// Creates each VIP's Maglev table (filled through mmap in one copy, its fingerprint after it)
/// and swaps it into the VIP's outer slot: the one atomic step packets can observe. The tables
/// are created and filled, then swapped in with one batched update per [`TABLE_BATCH`] VIPs. The kernel waits for an RCU grace period
/// after each update of an outer map (so that no program still uses an old table when the call
/// returns), ~14 ms here: one wait per batch instead of one per VIP is what makes a sync of a
/// thousand VIPs take half a second instead of fourteen. Each VIP's swap is still atomic.
pub fn install_maglev_tables(maps: &mut Maps, tables: &[TableWrite<'_>]) -> anyhow::Result<()> {
    for chunk in tables.chunks(TABLE_BATCH) {
        let mut inners = Vec::with_capacity(chunk.len());
        for t in chunk {
            let size = u32::try_from(t.picks.len()).context("Maglev table too large")?;
            let total = inner_elements(size).context("Maglev table too large")?;
            let inner = new_maglev_table(total)
                .with_context(|| format!("building the Maglev table of VIP #{}", t.vip_id))?;
            let mut mapping = MaglevMapping::new(&inner, size, libc::PROT_READ | libc::PROT_WRITE)?;
            mapping.write_picks(t.picks, t.backends);
            mapping.write_fingerprint(t.fingerprint);
            drop(mapping);
            inners.push(inner);
        }
        let keys: Vec<u32> = chunk.iter().map(|t| t.vip_id).collect();
        let fds: Vec<u32> = inners
            .iter()
            .map(|m| m.fd().as_fd().as_raw_fd() as u32)
            .collect();
        // Until a swap is known to have happened, the VIP's table is unknown here.
        for t in chunk {
            maps.swapped_in.remove(&t.vip_id);
        }
        let record = |t: &TableWrite<'_>| (t.vip_id, (t.picks.len() as u32, t.fingerprint));
        if chunk.len() > 1 && update_batch(&maps.maglev_fd, &keys, &fds).is_ok() {
            maps.swapped_in.extend(chunk.iter().map(record));
            continue;
        }
        // One VIP, or a kernel without batched updates of this map type: one at a time.
        for (t, inner) in chunk.iter().zip(&inners) {
            maps.maglev
                .set(t.vip_id, inner, 0)
                .map_err(|e| anyhow!("swapping in the Maglev table of VIP #{}: {e}", t.vip_id))?;
            maps.swapped_in.extend([record(t)]);
        }
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
/// the mapping, followed by the fingerprint element.
pub(super) struct MaglevMapping {
    addr: *mut libc::c_void,
    len: usize,
    /// Table slots; the fingerprint is the element after them.
    slots: usize,
}

/// Bytes per element of an array map's value area.
pub(super) const ARRAY_STRIDE: usize = 8;

impl MaglevMapping {
    /// Maps the value area of `map`, the inner array of a table of `slots` slots.
    pub(super) fn new(map: &MapData, slots: u32, prot: libc::c_int) -> anyhow::Result<Self> {
        let elements = inner_elements(slots).context("Maglev table too large")? as usize;
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

    /// Offset of the fingerprint element, in bytes.
    fn fingerprint_offset(&self) -> usize {
        lb_common::maglev_elements(self.slots as u32) as usize * ARRAY_STRIDE
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

    /// The element after the slots := `fingerprint`.
    pub(super) fn write_fingerprint(&mut self, fingerprint: u64) {
        // SAFETY: the fingerprint element lies within the mapping (see `new`), 8-aligned.
        unsafe {
            let at = (self.addr as *mut u8).add(self.fingerprint_offset()) as *mut u64;
            at.write(fingerprint);
        }
    }

    /// The fingerprint written by [`Self::write_fingerprint`].
    pub(super) fn fingerprint(&self) -> Option<u64> {
        // SAFETY: as in `write_fingerprint`.
        Some(unsafe {
            let at = (self.addr as *const u8).add(self.fingerprint_offset()) as *const u64;
            at.read()
        })
    }
}

impl Drop for MaglevMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
