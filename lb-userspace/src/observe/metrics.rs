//! Prometheus `/metrics`: the dataplane's counters, read from the pinned maps on each scrape,
//! composed with the instruments each subsystem owns and registers ([`Instruments`]: the
//! reconcile driver's, the health checks', the agent's Kubernetes watches'). `sluice run` and
//! `sluice agent` serve it.
//!
//! Label sets are bounded by the maps: `vip` by MAX_VIPS, `backend` by MAX_BACKENDS, `reason`
//! by the global counters, `resource` by the agent's three watches.
//!
//! The connection tables are the one thing a scrape cannot read cheaply (the kernel keeps no
//! count: one syscall per entry, about a second for a million). They are counted off the scrape,
//! by a [`FlowCounter`]: a scrape waits at most [`FLOW_COUNT_WAIT`] for a count (a small table's
//! is always fresh) and otherwise serves the last one, and the walks take at most a tenth of a
//! CPU however often `/metrics` is scraped.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow};
use lb_common::GlobalCounter;
use log::{info, warn};
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

use super::read;
use crate::{
    dataplane::{Maps, PinLayout, Snapshot, members_by_table},
    http,
};

/// Where `sluice run` and `sluice agent` serve `/metrics` unless told otherwise: loopback only.
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9477";

/// Most connection-table entries counted per family and scrape: the walk is one syscall per
/// entry, so a huge table is reported as "at least this many" instead of stalling the scrape.
pub const FLOW_COUNT_LIMIT: usize = 1 << 20;

type Labels = Vec<(&'static str, String)>;

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

/// How long a scrape waits for a connection-table count before serving the last one.
pub const FLOW_COUNT_WAIT: Duration = Duration::from_millis(100);
/// A new count starts once this many times the last one's duration has passed since it
/// ended: the walks take at most 1/(1 + this) of a CPU.
const FLOW_COUNT_REST: u32 = 10;

/// Connection-table entries (IPv4, IPv6), as last counted.
#[derive(Clone, Copy, Debug)]
pub struct FlowCount {
    pub ipv4: usize,
    pub ipv6: usize,
    /// When the count ended, and how long it took.
    pub done: Instant,
    pub took: Duration,
}

/// Counts the connection tables pinned at a layout on a thread of its own, one count at a time
/// (see the module's header).
#[derive(Default)]
pub struct FlowCounter {
    state: Mutex<CountState>,
}

#[derive(Default)]
struct CountState {
    last: Option<FlowCount>,
    running: Option<mpsc::Receiver<anyhow::Result<FlowCount>>>,
}

impl FlowCounter {
    /// The freshest count available within [`FLOW_COUNT_WAIT`] (starting one if due); `None`
    /// until a first count ends.
    pub fn get(&self, pins: &PinLayout) -> Option<FlowCount> {
        let Ok(mut state) = self.state.lock() else {
            return None;
        };
        let due = state
            .last
            .is_none_or(|l| l.done.elapsed() >= l.took * FLOW_COUNT_REST);
        if state.running.is_none() && due {
            let (tx, rx) = mpsc::sync_channel(1);
            let pins = pins.clone();
            let started = std::thread::Builder::new()
                .name("flow-count".into())
                .spawn(move || {
                    let _ = tx.send(count_flows(&pins));
                });
            match started {
                Ok(_) => state.running = Some(rx),
                Err(e) => warn!("cannot start counting the connection tables: {e}"),
            }
        }
        if let Some(running) = &state.running {
            match running.recv_timeout(FLOW_COUNT_WAIT) {
                Ok(Ok(count)) => {
                    state.last = Some(count);
                    state.running = None;
                }
                Ok(Err(e)) => {
                    warn!("counting the connection tables: {e:#}");
                    state.running = None;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => state.running = None,
            }
        }
        state.last
    }
}

fn count_flows(pins: &PinLayout) -> anyhow::Result<FlowCount> {
    let start = Instant::now();
    let maps = Maps::from_pins(pins)
        .with_context(|| format!("opening the maps pinned in {}", pins.maps_dir().display()))?;
    let (ipv4, ipv6) = maps.count_flows(FLOW_COUNT_LIMIT);
    Ok(FlowCount {
        ipv4,
        ipv6,
        done: Instant::now(),
        took: start.elapsed(),
    })
}

/// What the process's subsystems register on each scrape beside the dataplane's figures: each
/// owns its instruments (the reconcile driver, the health checks, the agent's watches) and
/// registers them itself; this only composes. Clones share the list.
#[derive(Clone, Default)]
pub struct Instruments(Vec<Arc<Register>>);

type Register = dyn Fn(&mut Registry) + Send + Sync;

impl Instruments {
    /// Adds a subsystem's registration (called on each scrape, in the order added).
    pub fn with(mut self, register: impl Fn(&mut Registry) + Send + Sync + 'static) -> Self {
        self.0.push(Arc::new(register));
        self
    }
}

/// The metrics text (OpenMetrics) for the maps as they are now, with the connection tables'
/// last count (`flows`; none: `sluice_flows` has no sample yet); without maps (the agent before
/// its first sync: nothing is attached yet) only the control plane's.
pub fn render(
    maps: Option<&Maps>,
    flows: Option<FlowCount>,
    instruments: &Instruments,
) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("sluice");
    registry.register(
        "build",
        "sluice's version",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]),
    );
    if let Some(maps) = maps {
        register_dataplane(&mut registry, maps, flows)?;
    }
    for register in &instruments.0 {
        register(&mut registry);
    }

    let mut text = String::new();
    encode(&mut text, &registry).map_err(|e| anyhow!("encoding metrics: {e}"))?;
    Ok(text)
}

/// The dataplane's figures, read from the maps.
fn register_dataplane(
    registry: &mut Registry,
    maps: &Maps,
    flows: Option<FlowCount>,
) -> anyhow::Result<()> {
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
    for (counter, value) in read::global_counters(maps)? {
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
    let backend_packets = counter_family(
        registry,
        "backend_packets",
        "Packets sent to a backend, over every VIP it serves",
    );
    let backend_bytes = counter_family(
        registry,
        "backend_bytes",
        "Bytes sent to a backend, over every VIP it serves",
    );
    let vip_table = gauge_family(
        registry,
        "vip_table",
        "The Maglev table a VIP picks from (VIPs with the same backends and weights share one)",
    );
    let draining = gauge_family(
        registry,
        "table_backend_draining",
        "1 if the backend, a member of the table, keeps its established flows there but takes no new ones",
    );
    // Per VIP, per table, per backend: never per (VIP, backend), which grows with VIPs x nodes
    // (10 million series at 10,000 VIP ports on 1,000 nodes).
    let current = Snapshot::read(maps)?;
    for (key, info) in &current.vips {
        let labels = vec![("vip", read::vip_addr(key).to_string())];
        let c = maps.vip_counters(info.id)?;
        vip_packets.get_or_create(&labels).inc_by(c.packets);
        vip_bytes.get_or_create(&labels).inc_by(c.bytes);
        live.get_or_create(&labels)
            .set(i64::from(info.live_backends));
        vip_table.get_or_create(&labels).set(i64::from(info.table));
    }
    for (table, members) in members_by_table(maps, &current.backends)? {
        for m in members {
            let labels = vec![
                ("table", table.to_string()),
                ("backend", m.addr().to_string()),
            ];
            draining.get_or_create(&labels).set(i64::from(m.draining));
        }
    }
    for (id, backend) in &current.backends {
        let c = maps.backend_counters(*id)?;
        let labels = vec![(
            "backend",
            lb_common::addr_from_raw(&backend.addr, backend.family).to_string(),
        )];
        backend_packets.get_or_create(&labels).inc_by(c.packets);
        backend_bytes.get_or_create(&labels).inc_by(c.bytes);
    }

    let guard = read::flood_guard(maps)?;
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

    let family = gauge_family(
        registry,
        "flows",
        "Connection-table entries, by family (counted up to 1048576 each)",
    );
    if let Some(count) = flows {
        family
            .get_or_create(&vec![("family", "ipv4".to_owned())])
            .set(count.ipv4 as i64);
        family
            .get_or_create(&vec![("family", "ipv6".to_owned())])
            .set(count.ipv6 as i64);
    }
    Ok(())
}

/// Serves `GET /metrics` on `addr` from the maps pinned at `pins` and `instruments`, and the
/// subsystems' own `routes` beside it, on a thread of its own. Only binds here (so a taken
/// address fails before anything is loaded); the maps are opened on each scrape, so they may be
/// pinned after this returns, and replaced. Until they are pinned, only the control plane's
/// figures are served.
pub fn serve(
    addr: SocketAddr,
    pins: &PinLayout,
    instruments: Instruments,
    routes: Vec<(&'static str, http::Handler)>,
) -> anyhow::Result<http::Server> {
    let pins = pins.clone();
    let flows = FlowCounter::default();
    let scrape = move || {
        // Until the first attach has published its maps: the figures without the dataplane's.
        if !pins.has_maps() {
            return render(None, None, &instruments);
        }
        let maps = Maps::from_pins(&pins)
            .with_context(|| format!("opening the maps pinned in {}", pins.maps_dir().display()))?;
        render(Some(&maps), flows.get(&pins), &instruments)
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
    let mut all = vec![("/metrics", metrics)];
    all.extend(routes);
    let server = http::serve(addr, "metrics", "--metrics-addr", all)?;
    info!("metrics on http://{addr}/metrics");
    Ok(server)
}
