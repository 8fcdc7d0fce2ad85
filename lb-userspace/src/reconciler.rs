//! The one control loop step both sources drive (`sluice run|attach` with a file, `sluice agent`
//! with the Kubernetes API): the first apply loads the balancer (adopting the maps pinned there,
//! so their flows are kept), reconciles and attaches with a pinned link (or swaps the program
//! into the live link); every later apply reconciles. Each reconcile is recorded in the metrics.

use std::time::Instant;

use log::{info, warn};

use crate::{
    dataplane::{self, Maps, PinLayout},
    memory,
    metrics::ControlMetrics,
    model::Desired,
    net::Interface,
    reconcile::{self, Summary, Unreachable},
};

pub struct Reconciler {
    iface: Interface,
    pins: PinLayout,
    generic: bool,
    unreachable: Unreachable,
    control: ControlMetrics,
    /// The loaded object and its maps, once attached.
    attached: Option<(aya::Ebpf, Maps)>,
}

impl Reconciler {
    /// Nothing is loaded until the first [`Reconciler::apply`].
    pub fn new(
        iface: Interface,
        pins: PinLayout,
        generic: bool,
        unreachable: Unreachable,
        control: ControlMetrics,
    ) -> Self {
        Self {
            iface,
            pins,
            generic,
            unreachable,
            control,
            attached: None,
        }
    }

    /// Brings the dataplane to `desired`; attaches first if this process has not yet.
    pub fn apply(&mut self, desired: &Desired) -> anyhow::Result<Summary> {
        if let Some((_, maps)) = &mut self.attached {
            let started = Instant::now();
            let result = reconcile::reconcile(maps, &self.iface, desired, self.unreachable);
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
        let mut ebpf = dataplane::load(Some(&self.pins), desired.settings.flow_table_size)?;
        let mut maps = Maps::from_ebpf(&mut ebpf)?;
        let started = Instant::now();
        let summary = reconcile::reconcile(&mut maps, &self.iface, desired, self.unreachable);
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

    /// The maps, once attached.
    pub fn maps_mut(&mut self) -> Option<&mut Maps> {
        self.attached.as_mut().map(|(_, maps)| maps)
    }

    /// Lets go of the program and maps (their pins stay, and keep forwarding).
    pub fn release(&mut self) {
        self.attached = None;
    }
}
