//! Prometheus `/metrics`: the dataplane's counters, read from the pinned maps on each scrape,
//! and the control plane's own figures (reconciles, their latency, Maglev rebuilds) that the
//! process records. `sluice run` and `sluice agent` serve it; the agent adds the state of its
//! Kubernetes watches ([`WatchMetrics`]).
//!
//! Label sets are bounded by the maps: `vip` by MAX_VIPS, `backend` by MAX_BACKENDS, `reason`
//! by the global counters, `resource` by the agent's three watches.

use std::{net::SocketAddr, time::Instant};

use anyhow::{Context as _, anyhow};
use lb_common::GlobalCounter;
use log::{info, warn};
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
        info::Info,
    },
    registry::Registry,
};

use crate::{
    dataplane::{Maps, PinLayout},
    http, inspect,
    reconcile::Summary,
};

/// Where `sluice run` and `sluice agent` serve `/metrics` unless told otherwise: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// Most connection-table entries counted per family and scrape: the walk is one syscall per
/// entry, so a huge table is reported as "at least this many" instead of stalling the scrape.
pub const FLOW_COUNT_LIMIT: usize = 1 << 20;

type Labels = Vec<(&'static str, String)>;

/// The control plane's figures. Clones share their values.
#[derive(Clone, Debug)]
pub struct ControlMetrics {
    reconciles: Family<Labels, Counter>,
    maglev_rebuilds: Counter,
    reconcile_seconds: Histogram,
    /// What the last reconcile had no room for.
    left_out: Gauge,
    /// Only the agent's.
    watches: Option<WatchMetrics>,
    /// Health checks and load (the agent, and `sluice run` with checks).
    health: Option<HealthMetrics>,
}

/// The state of the agent's Kubernetes watches, by `resource` (services, endpointslices,
/// nodes). Clones share their values.
#[derive(Clone, Debug, Default)]
pub struct WatchMetrics {
    up: Family<Labels, Gauge>,
    events: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    relists: Family<Labels, Counter>,
    objects: Family<Labels, Gauge>,
}

impl WatchMetrics {
    fn labels(resource: &str) -> Labels {
        vec![("resource", resource.to_owned())]
    }

    /// Whether the watch of `resource` is established (its last request succeeded, and no
    /// error came since).
    pub fn set_up(&self, resource: &str, up: bool) {
        self.up
            .get_or_create(&Self::labels(resource))
            .set(i64::from(up));
    }

    /// An added, modified or deleted object delivered by the watch (initial lists excluded).
    pub fn event(&self, resource: &str) {
        self.events.get_or_create(&Self::labels(resource)).inc();
    }

    /// A failed watch or list request, or a broken watch stream (each is retried).
    pub fn error(&self, resource: &str) {
        self.errors.get_or_create(&Self::labels(resource)).inc();
    }

    /// A full list after the first one: after 410 Gone, or a failed initial list.
    pub fn relist(&self, resource: &str) {
        self.relists.get_or_create(&Self::labels(resource)).inc();
    }

    /// Objects of `resource` held in the agent's cache.
    pub fn set_objects(&self, resource: &str, n: usize) {
        self.objects
            .get_or_create(&Self::labels(resource))
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Makes every figure of `resource` appear (as zero) before anything happens to it.
    pub fn declare(&self, resource: &str) {
        let labels = Self::labels(resource);
        self.up.get_or_create(&labels).set(0);
        self.events.get_or_create(&labels).inc_by(0);
        self.errors.get_or_create(&labels).inc_by(0);
        self.relists.get_or_create(&labels).inc_by(0);
        self.objects.get_or_create(&labels).set(0);
    }

    fn register(&self, registry: &mut Registry) {
        let k8s = registry.sub_registry_with_prefix("k8s");
        k8s.register(
            "watch_up",
            "1 while the watch of a resource is established, 0 while it fails and retries",
            self.up.clone(),
        );
        k8s.register(
            "watch_events",
            "Changes (added, modified, deleted objects) delivered by a watch, initial lists excluded",
            self.events.clone(),
        );
        k8s.register(
            "watch_errors",
            "Failed watch or list requests and broken watch streams (each retried with backoff)",
            self.errors.clone(),
        );
        k8s.register(
            "relists",
            "Full lists after the first (410 Gone: history compacted; or a failed list)",
            self.relists.clone(),
        );
        k8s.register(
            "objects",
            "Objects of a resource held in the agent's cache",
            self.objects.clone(),
        );
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self {
            reconciles: Family::default(),
            maglev_rebuilds: Counter::default(),
            // 100 µs to ~3 s: an unchanged config takes well under a millisecond, a table
            // rebuild of a large VIP tens of milliseconds, a neighbour lookup up to seconds.
            reconcile_seconds: Histogram::new(exponential_buckets(1e-4, 2.0, 16)),
            left_out: Gauge::default(),
            watches: None,
            health: None,
        }
    }
}

impl ControlMetrics {
    /// The agent's: with the state of its Kubernetes watches.
    pub fn with_watches() -> Self {
        Self {
            watches: Some(WatchMetrics::default()),
            ..Self::default()
        }
    }

    /// With health-check and load figures (and `/health/backends` served beside `/metrics`).
    pub fn with_health(self, health: HealthMetrics) -> Self {
        Self {
            health: Some(health),
            ..self
        }
    }

    /// The health figures, if any.
    pub fn health(&self) -> Option<&HealthMetrics> {
        self.health.as_ref()
    }

    /// The watches' figures, if these are the agent's.
    pub fn watches(&self) -> Option<&WatchMetrics> {
        self.watches.as_ref()
    }

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
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let family = Family::<Labels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let family = Family::<Labels, Gauge>::default();
    registry.register(name, help, family.clone());
    family
}

/// Connection-table entries of one table, counted up to [`FLOW_COUNT_LIMIT`].
fn count_entries<K: aya::Pod, V: aya::Pod>(
    map: &aya::maps::HashMap<aya::maps::MapData, K, V>,
) -> usize {
    // Entries evicted while the walk runs show up as errors: skip them.
    map.keys()
        .filter(Result::is_ok)
        .take(FLOW_COUNT_LIMIT)
        .count()
}

/// The metrics text (OpenMetrics) for the maps as they are now; without maps (the agent before
/// its first sync: nothing is attached yet) only the control plane's.
pub fn render(maps: Option<&Maps>, control: &ControlMetrics) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("sluice");
    registry.register(
        "build",
        "sluice's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]),
    );
    if let Some(maps) = maps {
        register_dataplane(&mut registry, maps)?;
    }
    registry.register(
        "reconciles",
        "Reconciles of the desired state into the maps, by result",
        control.reconciles.clone(),
    );
    registry.register(
        "maglev_rebuilds",
        "Maglev tables built and swapped in",
        control.maglev_rebuilds.clone(),
    );
    registry.register(
        "reconcile_left_out",
        "VIPs, backends and source ranges the maps had no room for at the last reconcile (the rest was applied)",
        control.left_out.clone(),
    );
    registry.register(
        "reconcile_duration_seconds",
        "How long a reconcile took",
        control.reconcile_seconds.clone(),
    );
    if let Some(watches) = &control.watches {
        watches.register(&mut registry);
    }
    if let Some(health) = &control.health {
        health.register(&mut registry);
    }

    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| anyhow!("encoding metrics: {e}"))?;
    Ok(text)
}

/// The dataplane's figures, read from the maps.
fn register_dataplane(registry: &mut Registry, maps: &Maps) -> anyhow::Result<()> {
    let drops = counter_family(
        registry,
        "drops",
        "Packets dropped by the XDP program, by reason",
    );
    let verdicts = counter_family(
        registry,
        "packets",
        "Packets seen by the XDP program, by what became of them (drops: sluice_drops_total)",
    );
    let lookups = counter_family(
        registry,
        "flow_lookups",
        "Connection-table lookups of VIP packets, by result (hit: established flow)",
    );
    let icmp = counter_family(
        registry,
        "icmp",
        "ICMP handled by the XDP program: echo replies and too-big answers sent, errors forwarded",
    );
    let trace = counter_family(
        registry,
        "trace_events",
        "Packets matched by `sluice trace`: reported, or lost (over its rate, or its ring full)",
    );
    for (counter, value) in inspect::global_counters(maps)? {
        let name = counter.name();
        let (family, label, what) = match counter {
            GlobalCounter::FlowHit | GlobalCounter::FlowMiss => {
                (&lookups, "result", name.trim_start_matches("flow_"))
            }
            // A subset of the misses: new flows the flood guard did not record.
            GlobalCounter::FlowsNotRecorded => (&lookups, "result", "not_recorded"),
            GlobalCounter::IcmpEchoReply
            | GlobalCounter::IcmpTooBigSent
            | GlobalCounter::IcmpErrorForwarded => {
                (&icmp, "kind", name.trim_start_matches("icmp_"))
            }
            GlobalCounter::TraceEvents => (&trace, "result", "reported"),
            GlobalCounter::TraceLostRate | GlobalCounter::TraceLostRing => {
                (&trace, "result", name.trim_start_matches("trace_"))
            }
            _ if name.starts_with("drop_") => (&drops, "reason", name.trim_start_matches("drop_")),
            // passed, tx, redirected, local, from_peer, decapsulated, arp_reply.
            _ => (&verdicts, "verdict", name),
        };
        family
            .get_or_create(&vec![(label, what.to_owned())])
            .inc_by(value);
    }

    let vip_packets = counter_family(registry, "vip_packets", "Packets for a VIP");
    let vip_bytes = counter_family(registry, "vip_bytes", "Bytes for a VIP");
    let live = gauge_family(
        registry,
        "vip_live_backends",
        "Backends of a VIP that take new flows",
    );
    let backend_packets = counter_family(registry, "backend_packets", "Packets sent to a backend");
    let backend_bytes = counter_family(registry, "backend_bytes", "Bytes sent to a backend");
    let draining = gauge_family(
        registry,
        "backend_draining",
        "1 if the backend keeps its established flows but takes no new ones",
    );
    for (vip, backends) in inspect::collect(maps)? {
        let labels = vec![("vip", vip.vip.clone())];
        vip_packets.get_or_create(&labels).inc_by(vip.packets);
        vip_bytes.get_or_create(&labels).inc_by(vip.bytes);
        live.get_or_create(&labels)
            .set(i64::from(vip.live_backends));
        for b in backends {
            let labels = vec![("vip", b.vip), ("backend", b.address)];
            backend_packets.get_or_create(&labels).inc_by(b.packets);
            backend_bytes.get_or_create(&labels).inc_by(b.bytes);
            draining
                .get_or_create(&labels)
                .set(i64::from(b.state == inspect::SlotState::Draining));
        }
    }

    let guard = inspect::flood_guard(maps)?;
    gauge_family(
        registry,
        "flood_guard_limit",
        "The flood guard's new flows per second and CPU before it holds (0: off)",
    )
    .get_or_create(&Vec::new())
    .set(i64::from(guard.max_new_flows_per_cpu));
    gauge_family(
        registry,
        "flood_guard_holding_cpus",
        "CPUs over the flood guard's rate now: their new flows are not recorded",
    )
    .get_or_create(&Vec::new())
    .set(i64::from(guard.cpus_holding));

    let flows = gauge_family(
        registry,
        "flows",
        "Connection-table entries, by family (counted up to 1048576 each)",
    );
    flows
        .get_or_create(&vec![("family", "ipv4".to_owned())])
        .set(count_entries(&maps.flows) as i64);
    flows
        .get_or_create(&vec![("family", "ipv6".to_owned())])
        .set(count_entries(&maps.flows6) as i64);
    Ok(())
}

/// Serves `GET /metrics` on `addr` from the maps pinned at `pins`, on a thread of its own.
/// Only binds here (so a taken address fails before anything is loaded); the maps are opened
/// on each scrape, so they may be pinned after this returns, and replaced. Until they are
/// pinned, only the control plane's figures are served.
pub fn serve(
    addr: SocketAddr,
    pins: &PinLayout,
    control: ControlMetrics,
) -> anyhow::Result<http::Server> {
    let pins = pins.clone();
    let control_health = control.health.clone();
    let scrape = move || {
        if !pins.has_maps() {
            return render(None, &control);
        }
        let maps = Maps::from_pins(&pins)
            .with_context(|| format!("opening the maps pinned in {}", pins.maps_dir().display()))?;
        render(Some(&maps), &control)
    };
    let metrics: http::Handler = Box::new(move || match scrape() {
        Ok(text) => http::Reply {
            status: 200,
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body: text,
        },
        Err(e) => {
            warn!("metrics scrape failed: {e:#}");
            http::Reply::text(500, format!("{e:#}\n"))
        }
    });
    let mut routes = vec![("/metrics", metrics)];
    if let Some(health) = &control_health {
        let board = health.board.clone();
        let backends: http::Handler = Box::new(move || http::Reply {
            status: 200,
            content_type: "application/json",
            body: serde_json::to_string(&board.rows()).unwrap_or_else(|_| "[]".into()),
        });
        routes.push((http::HEALTH_BACKENDS_PATH, backends));
    }
    let server = http::serve(addr, "metrics", "--metrics-addr", routes)?;
    info!("metrics on http://{addr}/metrics");
    Ok(server)
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
    pub board: crate::health::StatusBoard,
    /// Every node's published load, as last read.
    nodes: std::sync::Arc<std::sync::Mutex<Vec<(String, crate::health::NodeLoad)>>>,
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
    pub fn set_nodes(&self, nodes: Vec<(String, crate::health::NodeLoad)>) {
        if let Ok(mut n) = self.nodes.lock() {
            *n = nodes;
        }
    }

    fn register(&self, registry: &mut Registry) {
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
        for row in self.board.rows() {
            let labels = vec![("vip", row.vip.clone()), ("backend", row.backend.clone())];
            healthy
                .get_or_create(&labels)
                .set(i64::from(row.health != crate::health::Health::Down));
            base.get_or_create(&labels).set(i64::from(row.base_weight));
            effective
                .get_or_create(&labels)
                .set(i64::from(row.effective_weight));
            multiplier
                .get_or_create(&labels)
                .set(i64::from(row.multiplier));
        }
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
}
