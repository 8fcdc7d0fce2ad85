//! Per-CPU one-second rate windows: the flood guard (new flows recorded per second) and the
//! trace's event rate share [`within_rate`].

use aya_ebpf::{btf_maps::PerCpuArray, helpers::bpf_ktime_get_ns};
use lb_common::{RATE_WINDOW_NS, RateWindow};

use super::maps::{NEW_FLOWS, SETTINGS};

/// One more event in this CPU's one-second window of `windows`: false when over `limit`
/// (0: no limit). Shared by the flood guard and the trace's rate.
#[inline(always)]
pub(crate) fn within_rate(windows: &PerCpuArray<RateWindow, 1>, now: u64, limit: u32) -> bool {
    if limit == 0 {
        return true;
    }
    let Some(window) = windows.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: per-CPU slot, no other writer on this CPU while we run.
    unsafe {
        if now.wrapping_sub((*window).start_ns) >= RATE_WINDOW_NS {
            (*window).start_ns = now;
            (*window).flows = 0;
        }
        (*window).flows += 1;
        (*window).flows <= limit as u64
    }
}

/// The flood guard (Katran's new-connection rate limit): at most
/// `Settings::max_new_flows_per_cpu` connection-table inserts per second on this CPU. A flood
/// of forged new flows then costs a Maglev lookup each and cannot evict the real flows.
#[inline(always)]
pub(crate) fn new_flow_admitted() -> bool {
    let limit = match SETTINGS.get(0) {
        Some(settings) if settings.max_new_flows_per_cpu != 0 => settings.max_new_flows_per_cpu,
        _ => return true,
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    within_rate(&NEW_FLOWS, now, limit)
}
