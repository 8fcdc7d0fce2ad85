//! `sluice trace`'s side of the maps: the filter that switches the program's reporting on
//! (`TRACE`) and the ring buffer it reports into (`TRACE_EVENTS`). One trace at a time per
//! attachment: the filter names its reader, and lapses unless renewed, so a reader that dies
//! costs the dataplane nothing within seconds.

use std::os::fd::{AsFd as _, AsRawFd as _};
use std::path::Path;
use std::ptr;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use aya::Ebpf;
use aya::maps::{Array, Map, MapData, RingBuf};
use lb_common::{TraceEvent, TraceFilter, map_names};

use super::maps::open_pinned;
use super::pins::PinLayout;

/// How long a filter holds without renewal; [`TraceSession::renew`] is called far more often.
pub const TRACE_LEASE: Duration = Duration::from_secs(5);

/// A running trace: the filter is set, the ring is read. Dropping it switches reporting off.
pub struct TraceSession {
    filter_map: Array<MapData, TraceFilter>,
    ring: RingBuf<MapData>,
    filter: TraceFilter,
}

impl TraceSession {
    /// Opens the pinned trace maps of an attachment.
    pub fn open_pinned(pins: &PinLayout) -> anyhow::Result<TraceMaps> {
        let attach_with = "`sluice attach`, `sluice run` or `sluice agent`";
        trace_maps(|name| open_pinned(pins, name, attach_with))
    }

    /// Takes the trace maps out of a loaded object (the fixtures' harness).
    pub fn take_from(ebpf: &mut Ebpf) -> anyhow::Result<TraceMaps> {
        trace_maps(|name| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        })
    }

    /// Starts reporting the packets `filter` matches (its `until_ns` and `owner_pid` are set
    /// here). Refused while another live process holds an unexpired trace.
    pub fn start((filter_map, ring): TraceMaps, mut filter: TraceFilter) -> anyhow::Result<Self> {
        let now = monotonic_ns()?;
        let current = filter_map
            .get(&0, 0)
            .with_context(|| format!("reading the {} map", map_names::TRACE))?;
        let (me, my_ns) = (std::process::id(), pid_namespace());
        let mine = current.owner_pid == me && current.owner_pidns == my_ns && my_ns != 0;
        if current.until_ns > now && !mine {
            // A pid means something only inside its own pid namespace: a trace from the agent's
            // pod and one from the host number the same process differently, and the same
            // number may be two processes. So the owner is (pid, pid namespace), and only an
            // owner of our own namespace is checked in /proc (gone: taken over at once). Any
            // other unexpired claim is respected: its lease (TRACE_LEASE, renewed every second
            // by a live reader) lapses by itself within seconds of the reader's end, so this
            // errs on the safe side, never lets two traces share the filter. A pid reused
            // within our namespace costs at most that lease, too; no pidfd or start time is
            // needed for that.
            let same_ns = my_ns != 0 && current.owner_pidns == my_ns;
            if !same_ns {
                bail!(
                    "a trace is already running on this attachment, from another pid namespace (pid {} there: the agent's pod, the host, or another container): one at a time; stop it first (if it died, its claim lapses within {}s)",
                    current.owner_pid,
                    TRACE_LEASE.as_secs()
                );
            }
            if Path::new(&format!("/proc/{}", current.owner_pid)).exists() {
                bail!(
                    "a trace is already running on this attachment (pid {}): one at a time; stop it first",
                    current.owner_pid
                );
            }
        }
        let ring = RingBuf::try_from(ring)
            .map_err(|e| anyhow!("map {} is not a ring buffer: {e}", map_names::TRACE_EVENTS))?;
        filter.owner_pid = me;
        filter.owner_pidns = my_ns;
        filter.until_ns = now + TRACE_LEASE.as_nanos() as u64;
        let mut session = Self {
            filter_map,
            ring,
            filter,
        };
        // Events a dead reader left in the ring belong to its filter, not to this one.
        while session.ring.next().is_some() {}
        session.write()?;
        Ok(session)
    }

    /// Replaces the filter (keeping the reader and the lease).
    pub fn set_filter(&mut self, filter: TraceFilter) -> anyhow::Result<()> {
        self.filter = TraceFilter {
            until_ns: self.filter.until_ns,
            owner_pid: self.filter.owner_pid,
            owner_pidns: self.filter.owner_pidns,
            ..filter
        };
        self.renew()
    }

    /// Pushes the filter's lapse time forward (call at least every few seconds).
    pub fn renew(&mut self) -> anyhow::Result<()> {
        self.filter.until_ns = monotonic_ns()? + TRACE_LEASE.as_nanos() as u64;
        self.write()
    }

    fn write(&mut self) -> anyhow::Result<()> {
        self.filter_map
            .set(0, &self.filter, 0)
            .with_context(|| format!("writing the {} map", map_names::TRACE))
    }

    /// The events waiting in the ring, after waiting up to `timeout` for the first one.
    pub fn poll(&mut self, timeout: Duration) -> anyhow::Result<Vec<TraceEvent>> {
        let mut events = self.drain();
        if events.is_empty() {
            let mut fd = libc::pollfd {
                fd: self.ring.as_fd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: one valid pollfd, its count 1.
            if unsafe { libc::poll(&mut fd, 1, ms) } < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err).context("waiting on the trace ring buffer");
                }
            }
            events = self.drain();
        }
        Ok(events)
    }

    fn drain(&mut self) -> Vec<TraceEvent> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() >= size_of::<TraceEvent>() {
                // SAFETY: the program writes whole TraceEvents; read unaligned from the ring.
                events.push(unsafe { ptr::read_unaligned(item.as_ptr() as *const TraceEvent) });
            }
        }
        events
    }
}

impl Drop for TraceSession {
    fn drop(&mut self) {
        // Reporting off; if this fails the filter lapses by itself within TRACE_LEASE.
        let _ = self.filter_map.set(0, &TraceFilter::default(), 0);
    }
}

/// The inode of this process's pid namespace, or 0 when it cannot be told: when /proc is not
/// this namespace's (a host /proc mounted into a container: /proc/self is then not us), its
/// pids and namespace links describe others.
fn pid_namespace() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    let ours = std::fs::read_link("/proc/self")
        .is_ok_and(|p| p.as_os_str() == std::process::id().to_string().as_str());
    if !ours {
        return 0;
    }
    std::fs::metadata("/proc/self/ns/pid")
        .ok()
        .and_then(|m| u32::try_from(m.ino()).ok())
        .unwrap_or(0)
}

/// The filter and the ring (untyped until a session takes it).
pub type TraceMaps = (Array<MapData, TraceFilter>, Map);

fn trace_maps(mut take: impl FnMut(&str) -> anyhow::Result<Map>) -> anyhow::Result<TraceMaps> {
    let filter = take(map_names::TRACE)?
        .try_into()
        .map_err(|e| anyhow!("map {} has an unexpected layout: {e}", map_names::TRACE))?;
    Ok((filter, take(map_names::TRACE_EVENTS)?))
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> anyhow::Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(std::io::Error::last_os_error()).context("reading CLOCK_MONOTONIC");
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_pid_namespace_is_known() {
        use std::os::unix::fs::MetadataExt as _;
        let ino = std::fs::metadata("/proc/self/ns/pid").map(|m| m.ino());
        assert_eq!(pid_namespace() as u64, ino.expect("/proc/self/ns/pid"));
        assert_ne!(pid_namespace(), 0);
    }
}
