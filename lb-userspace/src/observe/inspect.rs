//! `sluice inspect`: what the maps hold, as rows for humans (aligned tables) and machines
//! (JSON). Every reader works on pinned maps, so it runs in another process than the one that
//! attached. Reads go through [`super::read`], output through [`super::render`].

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::anyhow;
use lb_common::{DecapCounter, IPPROTO_TCP, IPPROTO_UDP, addr_from_raw};
use serde_json::{Value, json};

use super::read::{
    BackendRow, FlowFilter, VipRow, agent_health, collect, flood_guard, global_counters,
    installed_or_rebuilt,
};
use super::render::{View, render_table};
use crate::{
    dataplane::{DecapMaps, Maps, Snapshot, members_by_table},
    model::{MacAddr, VipAddr, vip_key},
};

pub fn vips(maps: &Maps) -> anyhow::Result<View> {
    let rows: Vec<VipRow> = collect(maps)?.into_iter().map(|(v, _)| v).collect();
    let table = render_table(
        &[
            "VIP",
            "ID",
            "LIVE/BACKENDS",
            "TABLE",
            "OPTIONS",
            "PACKETS",
            "BYTES",
        ],
        rows.iter().map(|r| {
            vec![
                r.vip.clone(),
                r.id.to_string(),
                format!("{}/{}", r.live_backends, r.backends),
                // The table id: VIPs with the same backends and weights share one.
                format!("#{} ({} slots)", r.table, r.table_size),
                if r.options.is_empty() {
                    "-".to_owned()
                } else {
                    r.options.join(",")
                },
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        }),
    );
    Ok(View {
        json: json!({ "vips": rows }),
        table,
    })
}

pub fn backends(maps: &Maps) -> anyhow::Result<View> {
    let rows: Vec<BackendRow> = collect(maps)?.into_iter().flat_map(|(_, b)| b).collect();
    let table = render_table(
        &[
            "VIP", "BACKEND", "ID", "STATE", "WEIGHT", "MODE", "MAC", "IFINDEX", "PACKETS", "BYTES",
        ],
        rows.iter().map(|r| {
            vec![
                r.vip.clone(),
                r.address.clone(),
                r.backend_id.to_string(),
                r.state.name().to_owned(),
                r.weight.to_string(),
                r.mode.to_owned(),
                r.mac.clone(),
                r.ifindex.to_string(),
                r.packets.to_string(),
                r.bytes.to_string(),
            ]
        }),
    );
    Ok(View {
        json: json!({ "backends": rows }),
        table,
    })
}

/// [`backends`] with the health overlay's columns, fetched from the process serving /metrics at
/// `agent` (`off`, or nobody answering: the maps alone, the columns shown as `-`).
pub fn backends_with_health(maps: &Maps, agent: String) -> anyhow::Result<View> {
    let mut view = backends(maps)?;
    let Some(rows) = agent_health(&agent)? else {
        return Ok(view);
    };
    let find =
        |vip: &str, backend: &str| rows.iter().find(|r| r.vip == vip && r.backend == backend);
    let empty = Vec::new();
    let mut merged = Vec::new();
    for mut row in view.json["backends"].as_array().unwrap_or(&empty).clone() {
        let vip = row["vip"].as_str().unwrap_or_default().to_owned();
        let backend = row["address"].as_str().unwrap_or_default().to_owned();
        if let Some(h) = find(&vip, &backend) {
            row["base_weight"] = json!(h.base_weight);
            row["check"] = json!(h.check);
            row["health"] = json!(h.health);
            row["load"] = json!(h.load);
            row["multiplier_percent"] = json!(h.multiplier);
            row["node"] = json!(h.node);
            row["why"] = json!(h.why);
        }
        merged.push(row);
    }
    let cell = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or_default()),
        other => other.to_string(),
    };
    view.table = render_table(
        &[
            "VIP", "BACKEND", "ID", "STATE", "WEIGHT", "MODE", "MAC", "IFINDEX", "PACKETS",
            "BYTES", "BASE", "CHECK", "HEALTH", "LOAD", "MULT%", "WHY",
        ],
        merged.iter().map(|r| {
            [
                "vip",
                "address",
                "backend_id",
                "state",
                "weight",
                "mode",
                "mac",
                "ifindex",
                "packets",
                "bytes",
                "base_weight",
                "check",
                "health",
                "load",
                "multiplier_percent",
                "why",
            ]
            .iter()
            .map(|k| cell(&r[*k]))
            .collect()
        }),
    );
    view.json = json!({ "backends": merged });
    Ok(view)
}

/// The addresses this node answers ARP for (`sluice agent --announce`, the Leases it holds).
pub fn announce(maps: &Maps) -> anyhow::Result<View> {
    let mut rows = Vec::new();
    for (key, value) in maps.announced()? {
        rows.push((
            addr_from_raw(&key.addr, key.family).to_string(),
            MacAddr(value.mac).to_string(),
        ));
    }
    rows.sort();
    let json = json!({
        "announced": rows
            .iter()
            .map(|(a, m)| json!({"address": a, "mac": m}))
            .collect::<Vec<_>>()
    });
    let table = render_table(
        &["ADDRESS", "MAC"],
        rows.iter().map(|(a, m)| vec![a.clone(), m.clone()]),
    );
    Ok(View { json, table })
}

pub fn stats(maps: &Maps) -> anyhow::Result<View> {
    let mut global = serde_json::Map::new();
    let mut table = String::new();
    let mut global_rows = Vec::new();
    for (counter, v) in global_counters(maps)? {
        global.insert(counter.name().to_owned(), json!(v));
        global_rows.push(vec![counter.name().to_owned(), v.to_string()]);
    }
    table.push_str(&render_table(
        &["COUNTER", "PACKETS"],
        global_rows.into_iter(),
    ));
    let guard = flood_guard(maps)?;
    table.push_str(&match guard.max_new_flows_per_cpu {
        0 => "\nflood guard: off (every new flow is recorded)\n".to_owned(),
        limit => format!(
            "\nflood guard: {limit} new flows/s per CPU; holding on {} of {} CPUs now\n",
            guard.cpus_holding, guard.cpus
        ),
    });
    // Second chance's records of the flows this node handed on (one per moved flow it did
    // not know): how many chains pass through this node.
    let handed_flows = maps.handed_flows().flatten().count();
    if handed_flows > 0 {
        table.push_str(&format!(
            "second chance: {handed_flows} records of flows this node handed on (HANDED_FLOWS, of {})\n",
            lb_common::HANDED_FLOWS_SIZE
        ));
    }
    table.push('\n');

    let rows = collect(maps)?;
    let mut vips_json = Vec::new();
    let mut lines = Vec::new();
    for (vip, backends) in &rows {
        let total: u64 = backends.iter().map(|b| b.packets).sum();
        lines.push(vec![
            vip.vip.clone(),
            "(all)".into(),
            String::new(),
            vip.packets.to_string(),
            vip.bytes.to_string(),
            String::new(),
        ]);
        for b in backends {
            let share = if total == 0 {
                0.0
            } else {
                100.0 * b.packets as f64 / total as f64
            };
            lines.push(vec![
                String::new(),
                b.address.clone(),
                b.state.name().to_owned(),
                b.packets.to_string(),
                b.bytes.to_string(),
                format!("{share:.1}%"),
            ]);
        }
        vips_json.push(json!({
            "vip": vip.vip,
            "packets": vip.packets,
            "bytes": vip.bytes,
            "backends": backends.iter().map(|b| json!({
                "address": b.address,
                "state": b.state,
                "packets": b.packets,
                "bytes": b.bytes,
            })).collect::<Vec<_>>(),
        }));
    }
    table.push_str(&render_table(
        &["VIP", "BACKEND", "STATE", "PACKETS", "BYTES", "SHARE"],
        lines.into_iter(),
    ));
    Ok(View {
        json: json!({
            "global": global,
            "flood_guard": guard,
            "handed_flows": handed_flows,
            "vips": vips_json,
        }),
        table,
    })
}

/// Rates between two `stats` views taken `secs` apart: per-VIP and per-backend packets and
/// bytes per second, and every global counter per second (`sluice inspect stats --watch`).
pub fn stats_rates(before: &Value, after: &Value, secs: f64) -> View {
    let rate = |a: &Value, b: &Value| {
        let (a, b) = (a.as_u64().unwrap_or(0), b.as_u64().unwrap_or(0));
        b.saturating_sub(a) as f64 / secs.max(1e-3)
    };
    let mut global = serde_json::Map::new();
    let mut global_rows = Vec::new();
    if let Some(counters) = after["global"].as_object() {
        for (name, value) in counters {
            let r = rate(&before["global"][name], value);
            global.insert(name.clone(), json!(r));
            global_rows.push(vec![name.clone(), format!("{r:.1}")]);
        }
    }
    let empty = Vec::new();
    let find = |list: &Value, field: &str, name: &Value| -> Value {
        list.as_array()
            .and_then(|l| l.iter().find(|e| e[field] == *name))
            .cloned()
            .unwrap_or(Value::Null)
    };
    let mut vips = Vec::new();
    let mut lines = Vec::new();
    for vip in after["vips"].as_array().unwrap_or(&empty) {
        let old = find(&before["vips"], "vip", &vip["vip"]);
        let (pps, bps) = (
            rate(&old["packets"], &vip["packets"]),
            rate(&old["bytes"], &vip["bytes"]),
        );
        let name = vip["vip"].as_str().unwrap_or_default().to_owned();
        lines.push(vec![
            name.clone(),
            "(all)".into(),
            String::new(),
            format!("{pps:.1}"),
            format!("{:.0}", bps * 8.0),
        ]);
        let mut backends = Vec::new();
        for b in vip["backends"].as_array().unwrap_or(&empty) {
            let old_b = find(&old["backends"], "address", &b["address"]);
            let (pps, bps) = (
                rate(&old_b["packets"], &b["packets"]),
                rate(&old_b["bytes"], &b["bytes"]),
            );
            lines.push(vec![
                String::new(),
                b["address"].as_str().unwrap_or_default().to_owned(),
                b["state"].as_str().unwrap_or_default().to_owned(),
                format!("{pps:.1}"),
                format!("{:.0}", bps * 8.0),
            ]);
            backends.push(json!({
                "address": b["address"], "state": b["state"],
                "packets_per_second": pps, "bytes_per_second": bps,
            }));
        }
        vips.push(json!({
            "vip": name, "packets_per_second": pps, "bytes_per_second": bps,
            "backends": backends,
        }));
    }
    let mut table = render_table(&["COUNTER", "PER SECOND"], global_rows.into_iter());
    table.push('\n');
    table.push_str(&render_table(
        &["VIP", "BACKEND", "STATE", "PACKETS/S", "BITS/S"],
        lines.into_iter(),
    ));
    View {
        json: json!({ "interval_seconds": secs, "global": global, "vips": vips }),
        table,
    }
}

/// How a VIP's Maglev table divides its slots among the backends.
pub fn maglev(maps: &Maps, vip: &VipAddr) -> anyhow::Result<View> {
    let info = maps
        .vip(&vip_key(vip))?
        .ok_or_else(|| anyhow!("VIP {vip} is not configured (`sluice inspect vips` lists them)"))?;
    let current = Snapshot::read(maps)?;
    let members = members_by_table(maps, &current.backends)?
        .remove(&info.table)
        .unwrap_or_default();
    let (table, unreadable) = installed_or_rebuilt(maps, &members, &info);
    let mut counts: BTreeMap<u32, u64> = BTreeMap::new();
    for id in &table {
        *counts.entry(*id).or_default() += 1;
    }
    let mut rows = Vec::new();
    for (id, count) in &counts {
        let (address, weight) = match members.iter().find(|m| m.id == *id) {
            Some(m) => (m.addr().to_string(), m.weight),
            None => ("(none)".to_owned(), 0),
        };
        rows.push(json!({
            "backend": address,
            "backend_id": id,
            "weight": weight,
            "table_slots": count,
            "share": *count as f64 / table.len().max(1) as f64,
        }));
    }
    let text = render_table(
        &["BACKEND", "WEIGHT", "TABLE SLOTS", "SHARE"],
        rows.iter().map(|r| {
            vec![
                r["backend"].as_str().unwrap_or_default().to_owned(),
                r["weight"].to_string(),
                r["table_slots"].to_string(),
                format!("{:.2}%", r["share"].as_f64().unwrap_or_default() * 100.0),
            ]
        }),
    );
    // The table as backend addresses in slot order, hashed: every node given the same state must
    // show the same value (backend ids are per node; addresses are what packets see).
    let mut fingerprint = lb_common::FLOW_HASH_SEED as u64 | 0xcbf2_9ce4_0000_0000;
    for id in &table {
        let address = current.backends.get(id).map(|b| b.addr).unwrap_or_default();
        for word in address {
            for byte in word.to_ne_bytes() {
                fingerprint = (fingerprint ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    Ok(View {
        json: json!({
            "vip": vip.to_string(),
            "table_id": info.table,
            "table_size": info.table_size,
            "table_fingerprint": format!("{fingerprint:016x}"),
            "table": if unreadable.is_some() { "rebuilt" } else { "installed" },
            "backends": rows,
        }),
        table: format!(
            "{vip}: Maglev table of {} slots{}\n{text}",
            info.table_size,
            unreadable.map_or(String::new(), |e| format!(
                " (rebuilt from the table's members as the agent builds it: the installed one \
                 cannot be opened here, {e})"
            ))
        ),
    })
}

/// Connection-table entries matching `filter`, at most `limit` of them (the table can hold
/// millions); `total` counts all, `matched` those that match.
pub fn flows(maps: &Maps, limit: usize, filter: &FlowFilter) -> anyhow::Result<View> {
    let current = Snapshot::read(maps)?;
    let mut rows = Vec::new();
    let (mut total, mut matched) = (0usize, 0usize);
    for entry in maps.flow_entries() {
        let Some((key, value)) = entry else {
            continue; // evicted while we walked the table
        };
        total += 1;
        let backend_addr = current.backend_addr(u32::from(value.backend));
        if !filter.matches(&key, backend_addr) {
            continue;
        }
        matched += 1;
        if rows.len() >= limit {
            continue;
        }
        let proto = match key.proto {
            IPPROTO_TCP => "tcp",
            IPPROTO_UDP => "udp",
            _ => "?",
        };
        let backend = backend_addr.map_or_else(|| "(removed)".into(), |a| a.to_string());
        let endpoint = |raw: &lb_common::Addr, port: u16| {
            std::net::SocketAddr::new(addr_from_raw(raw, key.family), u16::from_be(port))
        };
        rows.push(json!({
            "client": endpoint(&key.src, key.sport).to_string(),
            "vip": format!("{}/{proto}", endpoint(&key.dst, key.dport)),
            "backend": backend,
        }));
    }
    let mut table = render_table(
        &["CLIENT", "VIP", "BACKEND"],
        rows.iter().map(|r| {
            ["client", "vip", "backend"]
                .iter()
                .map(|k| r[*k].as_str().unwrap_or_default().to_owned())
                .collect()
        }),
    );
    let _ = write!(
        table,
        "{} of {matched} matching flows shown ({total} in the table)",
        rows.len()
    );
    Ok(View {
        json: json!({ "total": total, "matched": matched, "shown": rows.len(), "flows": rows }),
        table,
    })
}

/// The decapsulator's counters (`sluice decap inspect`).
pub fn decap(maps: &DecapMaps) -> anyhow::Result<View> {
    let mut counters = serde_json::Map::new();
    let mut rows = Vec::new();
    for counter in DecapCounter::ALL {
        let total = maps.counter(counter)?;
        counters.insert(counter.name().to_owned(), json!(total));
        rows.push(vec![counter.name().to_owned(), total.to_string()]);
    }
    Ok(View {
        json: json!({ "counters": counters }),
        table: render_table(&["COUNTER", "PACKETS"], rows.into_iter()),
    })
}
