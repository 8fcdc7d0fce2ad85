//! The one control loop step both sources drive (`sluice run|attach` with a file, `sluice agent`
//! with the Kubernetes API): the first apply loads the balancer (adopting the maps pinned there,
//! so their flows are kept), reconciles and attaches with a pinned link (or swaps the program
//! into the live link); every later apply reconciles. Each reconcile is recorded in its
//! instruments ([`ReconcileMetrics`]).

use std::time::Instant;

use log::{info, warn};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{
    dataplane::{self, Maps, PinLayout},
    memory,
    model::{Desired, FlowState},
    net::Interface,
    reconcile::{self, Carry, Summary, Unreachable},
};

pub struct Reconciler {
    iface: Interface,
    pins: PinLayout,
    generic: bool,
    unreachable: Unreachable,
    control: ReconcileMetrics,
    /// The loaded object and its maps, once attached.
    attached: Option<(dataplane::Ebpf, Maps)>,
    /// What the last applies leave for the next ones (next hops, co-location written).
    carry: Carry,
    conntrack: ConntrackProbe,
}

impl Reconciler {
    /// Nothing is loaded until the first [`Reconciler::apply`].
    pub fn new(
        iface: Interface,
        pins: PinLayout,
        generic: bool,
        unreachable: Unreachable,
        control: ReconcileMetrics,
    ) -> Self {
        Self {
            iface,
            pins,
            generic,
            unreachable,
            control,
            attached: None,
            carry: Carry::default(),
            conntrack: ConntrackProbe::default(),
        }
    }

    /// Brings the dataplane to `desired`; attaches first if this process has not yet.
    pub fn apply(&mut self, desired: &Desired) -> anyhow::Result<Summary> {
        if let Some((ebpf, maps)) = &mut self.attached {
            self.conntrack.ask(ebpf, desired, &mut self.carry);
            let started = Instant::now();
            let result = reconcile::reconcile_reusing(
                maps,
                &self.iface,
                desired,
                self.unreachable,
                &mut self.carry,
            );
            self.control.record(started, &result);
            return result;
        }
        self.pins.prepare()?;
        if self.pins.has_maps() {
            info!(
                "adopting the maps pinned in {} (their flows are kept)",
                self.pins.maps_dir().display()
            );
        }
        if let Some(warning) = memory::check(desired) {
            warn!("{warning}");
        }
        let mut ebpf = dataplane::load(Some(&self.pins), desired.settings.connection_table_size())?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        self.conntrack.ask(&mut ebpf, desired, &mut self.carry);
        let started = Instant::now();
        let summary = reconcile::reconcile_reusing(
            &mut maps,
            &self.iface,
            desired,
            self.unreachable,
            &mut self.carry,
        );
        self.control.record(started, &summary);
        let summary = summary?;
        // The link is pinned too: a process killed with SIGKILL leaves the dataplane
        // forwarding, and the next one adopts link and maps (no flow lost).
        let replaced = dataplane::attach_pinned(
            &mut ebpf,
            lb_common::BALANCER_PROGRAM,
            &self.iface,
            self.generic,
            &self.pins,
        )?;
        info!(
            "{} {} ({} mode): {summary}; state pinned in {}",
            if replaced {
                "adopted the attachment (program replaced in place, flows kept) on"
            } else {
                "attached to"
            },
            self.iface.name,
            if self.generic { "generic" } else { "native" },
            self.pins.dir().display()
        );
        self.attached = Some((ebpf, maps));
        Ok(summary)
    }

    /// [`Reconciler::apply`] afresh: every next hop asked of the kernel again and the maps read
    /// back, not taken from the earlier applies (the periodic refresh, [`NextHopRefresh`]).
    ///
    /// [`NextHopRefresh`]: crate::net::NextHopRefresh
    pub fn refresh(&mut self, desired: &Desired) -> anyhow::Result<Summary> {
        self.carry.renew();
        self.conntrack.asked = false;
        self.apply(desired)
    }

    /// The maps, once attached.
    pub fn maps_mut(&mut self) -> Option<&mut Maps> {
        self.attached.as_mut().map(|(_, maps)| maps)
    }

    /// Lets go of the program and maps (their pins stay, and keep forwarding).
    pub fn release(&mut self) {
        self.attached = None;
    }
}

/// Whether conntrack tracks this node's connections, asked once per refresh period when the
/// mode depends on it (`auto`; `second-chance`, which is warned about when it does not): a
/// kube-proxy that starts after the agent turns `auto` to second chance within a refresh.
#[derive(Debug, Default)]
struct ConntrackProbe {
    asked: bool,
    /// The mode, answer and forwarding (a VIP encapsulates) last logged.
    told: Option<(FlowState, Option<bool>, bool)>,
}

impl ConntrackProbe {
    fn ask(&mut self, ebpf: &mut dataplane::Ebpf, desired: &Desired, carry: &mut Carry) {
        let wanted = desired.settings.flow_state;
        if wanted == FlowState::Table || self.asked {
            return;
        }
        self.asked = true;
        let answer = dataplane::conntrack_tracks(ebpf);
        let tracks = answer.as_ref().ok().copied();
        carry.set_conntrack_tracks(tracks);
        // Logged when the mode or the answer changes, not at every refresh.
        let encapsulates = desired.encapsulates();
        if self.told == Some((wanted, tracks, encapsulates)) {
            return;
        }
        self.told = Some((wanted, tracks, encapsulates));
        let mode = wanted.effective(tracks, encapsulates);
        if let Err(e) = &answer {
            warn!(
                "{e:#}: flow_state {wanted} runs as if conntrack did not track this node's connections: running {mode}"
            );
            return;
        }
        match (wanted, tracks) {
            (_, Some(true)) if encapsulates => warn!(
                "flow_state {wanted}: this node's conntrack tracks its connections, but a VIP is forwarded encapsulated (IPIP/IP6IP6), whose receivers do not run the second-chance check: running {mode}{}",
                if mode == FlowState::SecondChance {
                    " (a moved connection of such a VIP whose first hop is not its pick is reset at a table change; use auto)"
                } else {
                    ""
                }
            ),
            (_, Some(true)) => info!(
                "flow_state {wanted}: this node's conntrack tracks its connections (a loopback connection of the agent's, found by bpf_xdp_ct_lookup): running {mode}"
            ),
            (FlowState::Auto, _) => info!(
                "flow_state auto: this node's conntrack does not track its connections (no netfilter rule uses it in this namespace): running {mode}"
            ),
            _ => warn!(
                "flow_state {wanted}: this node's conntrack does not track its connections: a mid-flow packet of a VIP whose table changed is handed on even when its connection is this node's (reset there); use auto or table, or a netfilter rule that uses conntrack (kube-proxy's do)"
            ),
        }
    }
}

/// The reconcile driver's instruments (`sluice_reconcile*`, `sluice_maglev_rebuilds`): recorded
/// by [`Reconciler::apply`], composed into `/metrics` on each scrape. Clones share their values.
#[derive(Clone, Debug)]
pub struct ReconcileMetrics {
    reconciles: Family<Labels, Counter>,
    maglev_rebuilds: Counter,
    reconcile_seconds: Histogram,
    /// What the last reconcile had no room for.
    left_out: Gauge,
}

type Labels = Vec<(&'static str, String)>;

impl Default for ReconcileMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            maglev_rebuilds: Counter::default(),
            // 100 µs to ~3 s: an unchanged config takes well under a millisecond, a table
            // rebuild of a large VIP tens of milliseconds, a neighbour lookup up to seconds.
            reconcile_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            left_out: Gauge::default(),
        }
    }
}

impl ReconcileMetrics {
    /// Records one reconcile that started at `started`.
    pub fn record(&self, started: Instant, result: &anyhow::Result<Summary>) {
        self.reconcile_seconds
            .observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(summary) => {
                self.maglev_rebuilds.inc_by(summary.tables_rebuilt as u64);
                self.left_out
                    .set(i64::try_from(summary.left_out.len()).unwrap_or(i64::MAX));
                "ok"
            }
            Err(_) => "error",
        };
        self.reconciles
            .get_or_create(&vec![("result", outcome.to_owned())])
            .inc();
    }

    /// Registers the reconciles' figures on `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "reconciles",
            "Reconciles of the desired state into the maps, by result",
            self.reconciles.clone(),
        );
        registry.register(
            "maglev_rebuilds",
            "Maglev tables built and swapped in",
            self.maglev_rebuilds.clone(),
        );
        registry.register(
            "reconcile_left_out",
            "VIPs, backends and source ranges the maps had no room for at the last reconcile (the rest was applied)",
            self.left_out.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "How long a reconcile took",
            self.reconcile_seconds.clone(),
        );
    }
}
