//! Maglev tables as inner maps: built through mmap in one copy, swapped into the outer array
//! in batches (the one atomic step packets can observe), read back with their fingerprint.

use super::*;

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
/// from (low half, high half). Written into the new inner map before it is swapped in, so it
/// always describes the table that is installed, whatever happened to a reconcile since.
/// The program never reads them (it picks a slot modulo the VIP's table size).
pub const FINGERPRINT_ELEMENTS: u32 = 2;

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
            let total = size
                .checked_add(FINGERPRINT_ELEMENTS)
                .context("Maglev table too large")?;
            let inner = new_maglev_table(total)
                .with_context(|| format!("building the Maglev table of VIP #{}", t.vip_id))?;
            let mut mapping =
                MaglevMapping::new(&inner, total, libc::PROT_READ | libc::PROT_WRITE)?;
            mapping.write_picks(t.picks, t.backends);
            mapping.write_fingerprint(size, t.fingerprint);
            drop(mapping);
            inners.push(inner);
        }
        let keys: Vec<u32> = chunk.iter().map(|t| t.vip_id).collect();
        let fds: Vec<u32> = inners
            .iter()
            .map(|m| m.fd().as_fd().as_raw_fd() as u32)
            .collect();
        if chunk.len() > 1 && update_batch(&maps.maglev_fd, &keys, &fds).is_ok() {
            continue;
        }
        // One VIP, or a kernel without batched updates of this map type: one at a time.
        for (t, inner) in chunk.iter().zip(&inners) {
            maps.maglev
                .set(t.vip_id, inner, 0)
                .map_err(|e| anyhow!("swapping in the Maglev table of VIP #{}: {e}", t.vip_id))?;
        }
    }
    Ok(())
}

pub(super) fn new_maglev_table(size: u32) -> anyhow::Result<MapData> {
    let obj = aya_obj::Map::new_from_params(
        aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        4,
        size,
        MAGLEV_INNER_FLAGS,
    );
    MapData::create(obj, "sluice_maglev", None)
        .map_err(|e| anyhow!("creating a Maglev table of {size} slots: {e}"))
}

/// An mmap of an array map's values (`BPF_F_MMAPABLE`). The kernel lays array elements out
/// with a stride of the value size rounded up to 8 bytes: slot i of a u32 table is at 8 * i.
pub(super) struct MaglevMapping {
    addr: *mut libc::c_void,
    len: usize,
    slots: usize,
}

pub(super) const ARRAY_STRIDE: usize = 8;

impl MaglevMapping {
    pub(super) fn new(map: &MapData, slots: u32, prot: libc::c_int) -> anyhow::Result<Self> {
        let slots = slots as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (slots * ARRAY_STRIDE).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's value area, of the map's rounded size.
        let addr = unsafe { libc::mmap(ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
        if addr == libc::MAP_FAILED {
            bail!(
                "mmap of a Maglev table: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(Self { addr, len, slots })
    }

    pub(super) fn elements(&self) -> &[u64] {
        // SAFETY: the mapping holds `slots` 8-byte elements and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.addr as *const u64, self.slots) }
    }

    pub(super) fn read(&self) -> Vec<u32> {
        // The u32 value sits in the first four bytes of each element.
        self.elements().iter().map(|e| element_value(*e)).collect()
    }

    /// Element i := backends[picks[i]], or NO_BACKEND.
    pub(super) fn write_picks(&mut self, picks: &[u32], backends: &[u32]) {
        // SAFETY: as above, mapped writable by `new` when called with PROT_WRITE.
        let elements = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u64, self.slots) };
        for (element, pick) in elements.iter_mut().zip(picks) {
            let slot = backends
                .get(*pick as usize)
                .copied()
                .unwrap_or(lb_common::NO_BACKEND);
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&slot.to_ne_bytes());
            *element = u64::from_ne_bytes(bytes);
        }
    }

    /// Elements `at` and `at + 1` := the two halves of `fingerprint`.
    pub(super) fn write_fingerprint(&mut self, at: u32, fingerprint: u64) {
        // SAFETY: as above, mapped writable by `new` when called with PROT_WRITE.
        let elements = unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u64, self.slots) };
        let halves = [fingerprint as u32, (fingerprint >> 32) as u32];
        for (element, half) in elements.iter_mut().skip(at as usize).zip(halves) {
            let mut bytes = [0u8; 8];
            bytes[..4].copy_from_slice(&half.to_ne_bytes());
            *element = u64::from_ne_bytes(bytes);
        }
    }

    /// The fingerprint written by [`Self::write_fingerprint`] at `at`.
    pub(super) fn fingerprint(&self, at: u32) -> Option<u64> {
        let mut halves = self.elements().iter().skip(at as usize);
        let low = u64::from(element_value(*halves.next()?));
        let high = u64::from(element_value(*halves.next()?));
        Some(low | (high << 32))
    }
}

/// The u32 value in the first four bytes of an array element.
pub(super) fn element_value(element: u64) -> u32 {
    let b = element.to_ne_bytes();
    u32::from_ne_bytes([b[0], b[1], b[2], b[3]])
}

impl Drop for MaglevMapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}
