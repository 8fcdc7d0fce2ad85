//! The raw bpf(2) batch calls aya does not offer (lookup and update of many elements at once).

use std::os::fd::{AsRawFd as _, OwnedFd};

/// The batch member of `union bpf_attr`.
#[repr(C)]
pub(super) struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);
pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `BPF_MAP_LOOKUP_BATCH` of a whole u32-keyed map from its start into `keys` and `values`
/// (as many entries as they hold); returns how many were read.
pub(super) fn lookup_batch<V: Copy>(
    map: &OwnedFd,
    keys: &mut [u32],
    values: &mut [V],
) -> std::io::Result<usize> {
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // The attribute points at buffers of `count` keys and values (V is the map's value type,
    // #[repr(C)]) and at the 4-byte batch token, all outliving the call.
    let rc = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
    // ENOENT: the end of the map was reached; `count` says how many entries came back.
    if rc < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::ENOENT) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(attr.count as usize)
}

/// Every entry of a hash map, `chunk` at a time (`BPF_MAP_LOOKUP_BATCH` with the kernel's
/// bucket token: one syscall per chunk where iterating costs two per entry). `K` and `V` are
/// the map's key and value types (`#[repr(C)]`, plain data).
pub(super) fn lookup_hash_all<K: Copy + Default, V: Copy + Default>(
    map: &OwnedFd,
    chunk: usize,
) -> std::io::Result<Vec<(K, V)>> {
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    let mut out = Vec::new();
    let mut token: Option<u32> = None;
    loop {
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: token.as_mut().map_or(0, |t| t as *mut u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // The attribute points at `chunk` keys and values and at the two 4-byte tokens (a hash
        // map's token is a bucket index), all outliving the call.
        let rc = bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let error = (rc < 0).then(std::io::Error::last_os_error);
        let n = (attr.count as usize).min(chunk);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match error {
            None => token = Some(next),
            // The end of the map.
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
    }
}

/// `BPF_MAP_UPDATE_BATCH` of u32 keys and u32 values (here: inner map descriptors).
pub(super) fn update_batch(map: &OwnedFd, keys: &[u32], values: &[u32]) -> std::io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len().min(values.len()) as u32,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // The attribute points at `count` keys and values that outlive the call.
    if bpf_batch(BPF_MAP_UPDATE_BATCH, &mut attr) < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The `bpf(2)` call of a batch command; the caller makes `attr`'s pointers valid for it.
pub(super) fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> libc::c_long {
    // SAFETY: `attr` is a live, correctly sized attribute; its buffers are the caller's to
    // keep valid (both callers pass slices that outlive this call).
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    }
}
