//! The health checks' and node loads' instruments (`sluice_health_*`, `sluice_load_*`,
//! `sluice_backend_*` of the overlay, `sluice_node_load*`): the probes and the load loop count,
//! `/metrics` composes them on each scrape; and the `/health/backends` route they answer.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::{Health, NodeLoad, StatusBoard, StatusGroup};
use crate::http;

/// Series per (VIP, backend) family: beyond it a scrape would grow with VIPs x nodes (10
/// million at 10,000 VIP ports on 1,000 nodes); the rest is counted in
/// `sluice_backend_series_omitted` and every row stays at `/health/backends`.
pub const MAX_BACKEND_SERIES: i64 = 20_000;

type Labels = Vec<(&'static str, String)>;

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// Health checks and node load: counted as they happen, the rest read from the last overlay's
/// rows on each scrape. Label sets are bounded by the model (VIPs x backends, nodes). Clones
/// share their values.
#[derive(Clone, Debug, Default)]
pub struct HealthMetrics {
    probes: Family<Labels, Counter>,
    changes: Family<Labels, Counter>,
    own_load: Gauge<f64, std::sync::atomic::AtomicU64>,
    own_multiplier: Gauge,
    /// The last overlay (per VIP and backend).
    pub board: StatusBoard,
    /// Every node's published load, as last read.
    nodes: std::sync::Arc<std::sync::Mutex<Vec<(String, NodeLoad)>>>,
}

impl HealthMetrics {
    /// One probe, passed or failed.
    pub fn probe(&self, ok: bool) {
        let result = if ok { "ok" } else { "fail" };
        self.probes
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    /// A verdict changed to `to` (up, down, unchecked).
    pub fn change(&self, to: &str) {
        self.changes
            .get_or_create(&vec![("to", to.to_owned())])
            .inc();
    }

    /// This node's smoothed load and the multiplier it publishes (percent).
    pub fn own_load(&self, load: f64, multiplier: u32) {
        self.own_load.set(load);
        self.own_multiplier.set(i64::from(multiplier));
    }

    /// The nodes' published loads, as read from their Leases.
    pub fn set_nodes(&self, nodes: Vec<(String, NodeLoad)>) {
        if let Ok(mut n) = self.nodes.lock() {
            *n = nodes;
        }
    }

    /// Registers the health and load figures on `registry`: the counters as counted, the
    /// rest read from the last overlay's rows and the nodes' loads now.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "health_probes",
            "Health-check probes of backends, by result",
            self.probes.clone(),
        );
        registry.register(
            "health_changes",
            "Health verdict changes of backends, by the new verdict",
            self.changes.clone(),
        );
        registry.register(
            "load_own",
            "This node's smoothed load as it publishes it (0 idle, 1 saturated)",
            self.own_load.clone(),
        );
        registry.register(
            "load_own_multiplier_percent",
            "The weight multiplier this node publishes for itself, percent",
            self.own_multiplier.clone(),
        );
        let healthy = gauge_family(
            registry,
            "backend_healthy",
            "1 unless the backend's health check is down (unknown and unchecked count as 1)",
        );
        let base = gauge_family(
            registry,
            "backend_base_weight",
            "The backend's weight from its source (config, Node annotation, endpoints)",
        );
        let effective = gauge_family(
            registry,
            "backend_effective_weight",
            "The weight in the Maglev table after health and load (0: draining)",
        );
        let multiplier = gauge_family(
            registry,
            "backend_load_multiplier_percent",
            "The load multiplier applied to the backend's base weight, percent (100: neutral)",
        );
        let groups = self.board.groups();
        let mut room = MAX_BACKEND_SERIES;
        let mut omitted = 0;
        for row in groups.iter().flat_map(StatusGroup::expand) {
            if room == 0 {
                omitted += 1;
                continue;
            }
            room -= 1;
            let labels = vec![("vip", row.vip.clone()), ("backend", row.backend.clone())];
            healthy
                .get_or_create(&labels)
                .set(i64::from(row.health != Health::Down));
            base.get_or_create(&labels).set(i64::from(row.base_weight));
            effective
                .get_or_create(&labels)
                .set(i64::from(row.effective_weight));
            multiplier
                .get_or_create(&labels)
                .set(i64::from(row.multiplier));
        }
        gauge_family(
            registry,
            "backend_series_omitted",
            "(VIP, backend) pairs over the limit of series per family above (their rows are at /health/backends)",
        )
        .get_or_create(&Vec::new())
        .set(omitted);
        let load = Family::<Labels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "node_load",
            "Each node's load as published on its Lease (fresh ones only)",
            load.clone(),
        );
        let node_multiplier = gauge_family(
            registry,
            "node_load_multiplier_percent",
            "Each node's published weight multiplier, percent (stale: 100, neutral)",
        );
        if let Ok(nodes) = self.nodes.lock() {
            for (node, l) in nodes.iter() {
                let labels = vec![("node", node.clone())];
                if l.fresh {
                    load.get_or_create(&labels).set(l.load);
                }
                node_multiplier
                    .get_or_create(&labels)
                    .set(i64::from(if l.fresh { l.multiplier } else { 100 }));
            }
        }
    }

    /// `/health/backends` (the last overlay's rows as JSON, for `inspect backends` and `explain`),
    /// served beside `/metrics`.
    pub fn backends_route(&self) -> (&'static str, http::Handler) {
        let board = self.board.clone();
        let backends: http::Handler = Box::new(move || http::Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string(&board.groups()).unwrap_or_else(|_| "[]".into()),
        });
        (http::HEALTH_BACKENDS_PATH, backends)
    }
}
