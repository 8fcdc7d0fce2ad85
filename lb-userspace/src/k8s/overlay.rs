//! Health and load laid over the model the agent built from the API: `health` checks and
//! weighs, this module says which of the Kubernetes model's parts they act on (the Services'
//! per-VIP opt-outs, the nodes' names, the Leases read from the API).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::desired::Built;
use crate::health::{AgentHealth, load, overlay, probe, targets};

/// The agent's overlay of one freshly built model: probes follow the model's targets, failing
/// backends drain, the Leases' multipliers apply (per Service opt-out), and the rows go to
/// `/metrics` and `inspect backends`.
pub fn agent_overlay(
    built: &mut Built,
    prober: &probe::Prober,
    leases: Option<&[Arc<k8s_openapi::api::coordination::v1::Lease>]>,
    clock: &load::LeaseClock,
    config: &AgentHealth,
) {
    let Built {
        desired,
        sources,
        node_names,
        ..
    } = built;
    if !config.checks {
        for vip in &mut desired.vips {
            vip.health_check = None;
        }
    }
    // Each Service probes on its own share: one Service's silent ports stall none of the others.
    prober.set_targets(&targets(desired, &|vip| {
        sources
            .get(&vip.key)
            .map_or_else(|| vip.key.to_string(), |s| s.service.clone())
    }));
    let loads = match leases {
        Some(l) if config.load_aware => {
            // Leases count only for the cluster's Nodes (problems are logged by `load::follow`).
            let nodes: BTreeSet<String> = node_names.values().cloned().collect();
            load::node_loads(
                l,
                &nodes,
                clock,
                k8s_openapi::jiff::Timestamp::now(),
                std::time::Instant::now(),
            )
            .loads
        }
        _ => BTreeMap::new(),
    };
    if let Some(m) = &config.metrics {
        m.set_nodes(loads.iter().map(|(n, l)| (n.clone(), l.clone())).collect());
    }
    let rows = overlay(
        desired,
        node_names,
        &|addr, check| prober.verdict(addr, check),
        &|vip, addr| {
            if !sources.get(vip).is_none_or(|s| s.options.load_aware) {
                return None;
            }
            node_names.get(&addr).and_then(|n| loads.get(n)).cloned()
        },
    );
    if let Some(m) = &config.metrics {
        m.board.set(rows);
    }
}
