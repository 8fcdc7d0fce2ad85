//! The observers' one read layer: typed reads of the pinned maps (rows per VIP and backend,
//! global counters, the flood guard, the Maglev table installed or rebuilt as the agent builds
//! it with each backend's effective weight) and of the agent's health overlay over HTTP.
//! `inspect`, `explain`, `trace` and `metrics` read through here; nothing here renders.

use std::collections::BTreeMap;

use lb_common::{
    GlobalCounter, IPPROTO_UDP, NO_BACKEND, VipInfo, addr_from_raw, forward_mode, vip_flags,
};
use serde::Serialize;
use serde_json::Value;

use crate::{
    dataplane::{Maps, Member, Snapshot, members_by_table},
    health::{BackendStatus, StatusGroup},
    http,
    maglev::{MaglevBackend, build_table},
    model::{IpNet, MacAddr, Protocol, VipAddr, vip_key},
};

pub fn vip_addr(key: &lb_common::VipKey) -> VipAddr {
    VipAddr {
        addr: addr_from_raw(&key.addr, key.family),
        port: u16::from_be(key.port),
        protocol: match key.proto {
            IPPROTO_UDP => Protocol::Udp,
            _ => Protocol::Tcp,
        },
    }
}

/// How a backend's packets leave: named by the outer header, since either family of VIP can ride
/// in either family of tunnel.
pub fn mode_name(mode: u8) -> &'static str {
    match mode {
        forward_mode::IPIP_V4 => "ipip",
        forward_mode::IPIP_V6 => "ipip6",
        forward_mode::LOCAL => "local",
        _ => "l2",
    }
}

/// A backend's state in a VIP's table as readers show it (`active`, `draining` in JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Active,
    Draining,
}

impl MemberState {
    pub fn of(member: &Member) -> Self {
        if member.draining {
            Self::Draining
        } else {
            Self::Active
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
        }
    }
}

/// One backend of one VIP. The counters are the backend's over every VIP it serves (backends
/// are shared: `BACKEND_STATS` counts per backend).
#[derive(Serialize)]
pub struct BackendRow {
    pub vip: String,
    pub address: String,
    /// The backend's entry in `BACKENDS`, shared by every VIP that has it.
    pub backend_id: u32,
    pub state: MemberState,
    pub weight: u32,
    pub mode: &'static str,
    pub mac: String,
    pub ifindex: u32,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Serialize)]
pub struct VipRow {
    pub vip: String,
    pub id: u32,
    pub live_backends: u32,
    pub backends: usize,
    /// The Maglev table it points at (shared by every VIP with the same backends and weights).
    pub table: u32,
    pub table_size: u32,
    /// "affinity", "source_ranges": the options the program acts on.
    pub options: Vec<&'static str>,
    pub packets: u64,
    pub bytes: u64,
}

/// VIP rows and, per VIP, its backend rows, in VIP order (also what `/metrics` exports).
pub fn collect(maps: &Maps) -> anyhow::Result<Vec<(VipRow, Vec<BackendRow>)>> {
    let current = Snapshot::read(maps)?;
    let members = members_by_table(maps, &current.backends)?;
    let mut counters = BTreeMap::new();
    for id in current.backends.keys() {
        counters.insert(*id, maps.backend_counters(*id)?);
    }
    let mut rows: Vec<(VipAddr, VipRow, Vec<BackendRow>)> = Vec::new();
    for (key, info) in &current.vips {
        let vip = vip_addr(key);
        let c = maps.vip_counters(info.id)?;
        let mut backends: Vec<BackendRow> = members
            .get(&info.table)
            .into_iter()
            .flatten()
            .map(|m| {
                let c = counters.get(&m.id).copied().unwrap_or_default();
                BackendRow {
                    vip: vip.to_string(),
                    address: m.addr().to_string(),
                    backend_id: m.id,
                    state: MemberState::of(m),
                    weight: m.weight,
                    mode: mode_name(m.backend.mode),
                    mac: MacAddr(m.backend.dst_mac).to_string(),
                    ifindex: m.backend.ifindex,
                    packets: c.packets,
                    bytes: c.bytes,
                }
            })
            .collect();
        backends.sort_by_key(|b| b.address.parse::<std::net::IpAddr>().ok());
        rows.push((
            vip,
            VipRow {
                vip: vip.to_string(),
                id: info.id,
                live_backends: info.live_backends,
                backends: backends.len(),
                table: info.table,
                table_size: info.table_size,
                options: [
                    (vip_flags::AFFINITY, "affinity"),
                    (vip_flags::SOURCE_RANGES, "source_ranges"),
                ]
                .into_iter()
                .filter(|(flag, _)| info.flags & flag != 0)
                .map(|(_, name)| name)
                .collect(),
                packets: c.packets,
                bytes: c.bytes,
            },
            backends,
        ));
    }
    rows.sort_by_key(|(vip, _, _)| *vip);
    Ok(rows.into_iter().map(|(_, v, b)| (v, b)).collect())
}

/// Every global counter, summed over CPUs.
pub fn global_counters(maps: &Maps) -> anyhow::Result<Vec<(GlobalCounter, u64)>> {
    GlobalCounter::ALL
        .into_iter()
        .map(|counter| Ok((counter, maps.global_counter(counter)?)))
        .collect()
}

/// The flood guard right now: its limit (0: none) and how many of the CPUs are over it in
/// their current one-second window (their new flows ride on Maglev's pick alone).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct FloodGuard {
    pub max_new_flows_per_cpu: u32,
    pub cpus_holding: u32,
    pub cpus: u32,
}

pub fn flood_guard(maps: &Maps) -> anyhow::Result<FloodGuard> {
    let limit = maps.settings()?.max_new_flows_per_cpu;
    let windows = maps.new_flow_windows()?;
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC is bpf_ktime_get_ns's clock.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let now = now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64;
    let holding = windows
        .iter()
        .filter(|w| {
            limit != 0
                && now.saturating_sub(w.start_ns) < lb_common::RATE_WINDOW_NS
                && w.flows > u64::from(limit)
        })
        .count();
    Ok(FloodGuard {
        max_new_flows_per_cpu: limit,
        cpus_holding: holding as u32,
        cpus: windows.len() as u32,
    })
}

/// Which connection-table entries `sluice inspect flows` shows; `None` matches all.
#[derive(Clone, Debug, Default)]
pub struct FlowFilter {
    pub vip: Option<VipAddr>,
    pub backend: Option<std::net::IpAddr>,
    pub client: Option<IpNet>,
}

impl FlowFilter {
    pub fn matches(&self, key: &lb_common::FlowKey, backend: Option<std::net::IpAddr>) -> bool {
        let vip_ok = self.vip.is_none_or(|vip| {
            let k = vip_key(&vip);
            k.addr == key.dst && k.port == key.dport && k.proto == key.proto
        });
        let client = addr_from_raw(&key.src, key.family);
        vip_ok
            && self.backend.is_none_or(|b| backend == Some(b))
            && self.client.is_none_or(|net| net.contains(&client))
    }
}

/// The health overlay's rows from the process serving /metrics at `agent` (`off`, or nobody
/// answering: `None`).
pub fn agent_health(agent: &str) -> anyhow::Result<Option<Vec<BackendStatus>>> {
    if agent == "off" {
        return Ok(None);
    }
    let addr: std::net::SocketAddr = agent
        .parse()
        .map_err(|e| anyhow::anyhow!("--agent {agent:?}: {e}: expected ADDRESS:PORT or off"))?;
    match http::fetch(
        addr,
        http::HEALTH_BACKENDS_PATH,
        std::time::Duration::from_secs(2),
    )
    .and_then(|body| Ok(serde_json::from_str::<Value>(&body)?))
    {
        // Groups of VIPs that share their rows (`StatusGroup`), expanded here.
        Ok(v) => Ok(Some(
            serde_json::from_value::<Vec<Value>>(v)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|g| serde_json::from_value::<StatusGroup>(g).ok())
                .flat_map(|g| g.expand().collect::<Vec<_>>())
                .collect(),
        )),
        Err(e) => {
            log::debug!("no health columns: {e:#}");
            Ok(None)
        }
    }
}

/// The VIP's installed Maglev table, or, where it cannot be read, the one rebuilt from its
/// table's members with why. Opening an inner map by its id (BPF_MAP_GET_FD_BY_ID) takes
/// CAP_SYS_ADMIN, which the agent's pod does not have: there the table is rebuilt the way the
/// agent built it.
pub fn installed_or_rebuilt(
    maps: &Maps,
    members: &[Member],
    vip: &VipInfo,
) -> (Vec<u32>, Option<String>) {
    match maps.maglev_table(vip.table, vip.table_size) {
        Ok(table) => (table, None),
        Err(e) => (
            rebuild_table(members, vip.table_size),
            Some(format!("{e:#}")),
        ),
    }
}

/// The Maglev table of `size` slots the control plane builds from a table's members (each
/// backend's Maglev id and effective weight; backend ids in the table). The installed table is
/// this one unless a reconcile is under way.
pub fn rebuild_table(members: &[Member], size: u32) -> Vec<u32> {
    let inputs: Vec<MaglevBackend> = members
        .iter()
        .map(|m| MaglevBackend {
            id: lb_common::maglev_id(m.addr()),
            weight: m.effective_weight(),
        })
        .collect();
    build_table(&inputs, size)
        .into_iter()
        .map(|pick| members.get(pick as usize).map_or(NO_BACKEND, |m| m.id))
        .collect()
}
