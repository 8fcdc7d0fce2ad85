//! Desired model -> BPF maps. Resolves where the backends are (`resolve`, the only step that
//! asks the kernel), reads what the maps hold (the installed Maglev tables' fingerprints
//! included), plans every write (a pure function of both, fitting what the maps have room
//! for) before the first one, then writes in an order that packets can never observe
//! half-done ([`Phase`]): new backend entries, address sets and source ranges, then the new
//! Maglev tables (at ids no VIP points at), then the VIP entries (one atomic write each moves
//! a VIP to its new table), and only then frees what is gone. A reconcile stopped between any two phases leaves a
//! state the next one completes. The connection table is never flushed.
//!
//! [`driver`] is what both sources drive: the first apply loads and attaches, every later one
//! reconciles, each recorded in its instruments.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::bail;
use lb_common::{MAX_BACKENDS, MAX_SOURCE_RANGES, MAX_TABLES, MAX_VIPS};

use crate::{
    dataplane::{Maps, Snapshot},
    model::{Desired, VipAddr},
    net::Interface,
    resolve::{Found, Resolved, resolve_with},
};

mod apply;
pub mod driver;
mod plan;

use apply::{apply, apply_colocation};
use plan::{plan, plan_colocation};

/// What to do with a backend that cannot be resolved now (no ARP answer, no route).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// Refuse the whole state, change nothing (a config file: the operator fixes it).
    Fail,
    /// Keep it on its last known MAC, draining (its flows stay, it gets no new ones), or
    /// leave it out if it never had one; retry later (the agent: nodes come and go).
    Drain,
}

/// What one reconcile changed.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Summary {
    pub vips_added: usize,
    pub vips_removed: usize,
    pub backends_added: usize,
    pub backends_changed: usize,
    pub backends_removed: usize,
    pub tables_rebuilt: usize,
    /// Backends that could not be resolved: draining on their last known MAC, or left out.
    pub unresolved: BTreeSet<IpAddr>,
    /// What the maps had no room for (everything else was applied).
    pub left_out: Vec<LeftOut>,
}

impl Summary {
    /// Nothing was written.
    pub fn is_empty(&self) -> bool {
        Self {
            unresolved: BTreeSet::new(),
            left_out: Vec::new(),
            ..self.clone()
        } == Self::default()
    }

    /// Adds what a later pass of the same reconcile did; what is left out is the later pass's.
    fn add(&mut self, later: Summary) {
        self.vips_added += later.vips_added;
        self.vips_removed += later.vips_removed;
        self.backends_added += later.backends_added;
        self.backends_changed += later.backends_changed;
        self.backends_removed += later.backends_removed;
        self.tables_rebuilt += later.tables_rebuilt;
        self.left_out = later.left_out;
    }

    /// The summary as a line, or "" when nothing changed.
    pub fn to_string_if_changed(&self) -> String {
        if self.is_empty() {
            String::new()
        } else {
            self.to_string()
        }
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "vips +{} -{}, backends +{} ~{} -{}, maglev tables rebuilt {}",
            self.vips_added,
            self.vips_removed,
            self.backends_added,
            self.backends_changed,
            self.backends_removed,
            self.tables_rebuilt
        )?;
        if !self.left_out.is_empty() {
            write!(f, "; left out for lack of room: ")?;
            for (i, item) in self.left_out.iter().enumerate() {
                if i == 5 {
                    write!(f, ", and {} more", self.left_out.len() - 5)?;
                    break;
                }
                write!(f, "{}{item}", if i == 0 { "" } else { ", " })?;
            }
        }
        Ok(())
    }
}

/// The steps of an apply, in the order they run: a reconcile that fails or is killed stops
/// between two of them, and the next one must still bring the maps to the desired state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// `TX_PORTS` entries for backends behind other interfaces.
    TxPorts,
    /// New backend entries, and changes (a new MAC) of those that stay.
    NewBackends,
    /// The address filter admits every VIP address, old and new.
    FilterWidened,
    /// `VIP_ADDRS` and `SOURCE_RANGES` the new VIP entries rely on.
    AddressesAndRanges,
    /// Tables with new contents installed at ids no VIP points at.
    Tables,
    /// VIP entries written: each VIP moves to its table in one write.
    VipEntries,
    /// Removed VIPs' entries gone.
    VipsRemoved,
    /// Tables no VIP points at any more released.
    TablesFreed,
    /// Entries of backends no table has any more cleared.
    BackendsFreed,
    /// Addresses and source ranges no VIP refers to any more removed.
    StaleAddressesAndRanges,
    /// The address filter narrowed to the remaining VIPs.
    FilterNarrowed,
    /// The co-location maps (peers, inline decapsulation).
    Colocation,
}

impl Phase {
    pub const ALL: [Phase; 12] = [
        Phase::TxPorts,
        Phase::NewBackends,
        Phase::FilterWidened,
        Phase::AddressesAndRanges,
        Phase::Tables,
        Phase::VipEntries,
        Phase::VipsRemoved,
        Phase::TablesFreed,
        Phase::BackendsFreed,
        Phase::StaleAddressesAndRanges,
        Phase::FilterNarrowed,
        Phase::Colocation,
    ];
}

/// Called after each phase of an apply; an error stops the apply there.
type Hook<'a> = &'a mut dyn FnMut(Phase) -> anyhow::Result<()>;

pub use crate::model::vip_key;

pub use lb_common::{addr_from_raw, maglev_id, raw_addr};

/// Something the maps had no room for, left out of a reconcile (the rest is applied; the next
/// reconcile tries again).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LeftOut {
    /// A new VIP: no free VIP entry (at most `MAX_VIPS`), VIP address or room for its source
    /// ranges.
    Vip { vip: VipAddr },
    /// A new backend of a VIP: no free backend entry (at most `MAX_BACKENDS` distinct ones).
    Backend { vip: VipAddr, backend: IpAddr },
    /// A VIP's new set of backends: no free table (at most `MAX_TABLES` distinct ones); it keeps
    /// the table it has (a new VIP waits).
    Table { vip: VipAddr },
    /// New source ranges of a VIP (at most `MAX_SOURCE_RANGES` over all VIPs): it admits only
    /// the clients of those it had that are still listed.
    SourceRanges { vip: VipAddr },
}

impl std::fmt::Display for LeftOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Vip { vip } => write!(f, "VIP {vip} (at most {MAX_VIPS} VIPs)"),
            Self::Backend { vip, backend } => write!(
                f,
                "backend {backend} of {vip} (at most {MAX_BACKENDS} distinct backends)"
            ),
            Self::Table { vip } => write!(
                f,
                "the new backends of {vip} (at most {MAX_TABLES} distinct backend sets; it keeps its old ones)"
            ),
            Self::SourceRanges { vip } => write!(
                f,
                "new source ranges of {vip} (at most {MAX_SOURCE_RANGES} over all VIPs; it admits only the listed ones it had)"
            ),
        }
    }
}

/// Brings the maps to `desired`. On error nothing has been written if the error came from
/// resolving (with [`Unreachable::Fail`]) or planning; a syscall failure midway is reported,
/// and the next reconcile completes what this one left (it reads what is installed, the
/// Maglev tables' fingerprints included). What the maps have no room for is left out and
/// listed in [`Summary::left_out`]; everything else is applied.
pub fn reconcile(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    unreachable: Unreachable,
) -> anyhow::Result<Summary> {
    reconcile_reusing(maps, iface, desired, unreachable, &mut Carry::default())
}

/// What a reconcile leaves for the next ones of the same process: the next hops found
/// recently ([`Found`]) and the co-location sets it wrote last, written again only when they
/// change (a new process writes them once; at 1,000 nodes re-reading the peers' prefixes from
/// an LPM trie costs every apply tens of milliseconds).
#[derive(Debug, Default)]
pub struct Carry {
    found: Found,
    colocation: Option<plan::Colocation>,
    /// What the maps hold after this process's last apply, which wrote them whole (`None`
    /// after a failed one, or once renewed): the next plan starts from it, not from a read.
    /// Nothing else writes the balancer's maps.
    maps_hold: Option<Snapshot>,
}

impl Carry {
    /// Forgets what the earlier passes found and wrote: the next one asks the kernel for
    /// every next hop and reads the maps back (the periodic refresh: what the kernel or
    /// anything else changed under the process is seen within a refresh period).
    pub fn renew(&mut self) {
        self.found = Found::default();
        self.maps_hold = None;
    }

    /// What the conntrack probe answered since the last renewal (`None`: not asked).
    pub fn conntrack_tracks(&self) -> Option<bool> {
        self.found.conntrack_tracks
    }

    /// Records the conntrack probe's answer (`None`: it failed), for `flow_state: auto`.
    pub fn set_conntrack_tracks(&mut self, tracks: Option<bool>) {
        self.found.conntrack_tracks = tracks;
    }

    /// Test builds only: what this carry says the maps hold.
    #[cfg(feature = "test-hooks")]
    pub fn maps_hold(&self) -> Option<&Snapshot> {
        self.maps_hold.as_ref()
    }
}

/// [`reconcile`], reusing what `carry` kept from the earlier passes of this process.
pub fn reconcile_reusing(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    unreachable: Unreachable,
    carry: &mut Carry,
) -> anyhow::Result<Summary> {
    let resolved = resolve_with(iface, desired, &mut carry.found)?;
    if unreachable == Unreachable::Fail
        && let Some(((addr, mode), why)) = resolved.failures.iter().next()
    {
        let vip = desired
            .vips
            .iter()
            .find(|v| v.mode == *mode && v.backends.iter().any(|b| b.addr == *addr))
            .map(|v| v.key.to_string())
            .unwrap_or_default();
        bail!("{vip}: backend {addr}: {why}");
    }
    reconcile_resolved_carrying(maps, iface, desired, &resolved, carry)
}

/// [`reconcile_resolved`] carrying what it wrote from one call to the next: what
/// [`reconcile_reusing`] does after resolving (the harness's next hops come from `resolved`).
pub fn reconcile_resolved_carrying(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
    carry: &mut Carry,
) -> anyhow::Result<Summary> {
    reconcile_with(
        maps,
        iface,
        desired,
        resolved,
        &mut carry.colocation,
        &mut carry.maps_hold,
        &mut |_| Ok(()),
    )
}

/// [`reconcile`] after the resolve step: plan (pure) and apply.
pub fn reconcile_resolved(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
) -> anyhow::Result<Summary> {
    reconcile_with(
        maps,
        iface,
        desired,
        resolved,
        &mut None,
        &mut None,
        &mut |_| Ok(()),
    )
}

/// Test builds only (`test-hooks`): [`reconcile_resolved`] calling `hook` after each phase of
/// the apply; an error from it stops the apply there, as a killed or failed reconcile would.
#[cfg(feature = "test-hooks")]
pub fn reconcile_resolved_with_hook(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
    hook: &mut dyn FnMut(Phase) -> anyhow::Result<()>,
) -> anyhow::Result<Summary> {
    reconcile_with(maps, iface, desired, resolved, &mut None, &mut None, hook)
}

/// `written` is the co-location the maps hold (from this process's last reconcile), `None`
/// when unknown: it is written then. `maps_hold` is what the other maps hold, as the last
/// apply left them, `None` when unknown: they are read then.
fn reconcile_with(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
    written: &mut Option<plan::Colocation>,
    maps_hold: &mut Option<Snapshot>,
    hook: Hook<'_>,
) -> anyhow::Result<Summary> {
    let (mut summary, freed) = reconcile_pass(maps, iface, desired, resolved, maps_hold, hook)?;
    if !summary.left_out.is_empty() && freed {
        // Removals make room only once they are done (old and new entries coexist during an
        // apply, and a freed id is never reused in the apply that frees it): one more pass
        // uses it.
        let (second, _) = reconcile_pass(maps, iface, desired, resolved, maps_hold, hook)?;
        summary.add(second);
    }
    let colocation = plan_colocation(desired, resolved);
    if written.as_ref() != Some(&colocation) {
        // Forgotten first: a write that fails midway is redone in full.
        *written = None;
        apply_colocation(maps, &colocation)?;
        *written = Some(colocation);
    }
    hook(Phase::Colocation)?;
    summary.unresolved = resolved.unresolved();
    Ok(summary)
}

fn reconcile_pass(
    maps: &mut Maps,
    iface: &Interface,
    desired: &Desired,
    resolved: &Resolved,
    maps_hold: &mut Option<Snapshot>,
    hook: Hook<'_>,
) -> anyhow::Result<(Summary, bool)> {
    let current = match maps_hold.take() {
        Some(known) => known,
        None => Snapshot::read(maps)?,
    };
    let plan = match plan(&current, iface, desired, resolved) {
        Ok(plan) => plan,
        Err(e) => {
            // Nothing was written.
            *maps_hold = Some(current);
            return Err(e);
        }
    };
    // An apply that fails midway leaves `maps_hold` unknown: the next one reads the maps.
    let summary = apply(maps, &current, &plan, hook)?;
    *maps_hold = Some(plan.applied_to(current));
    Ok((summary, plan.frees))
}
