//! The config's schema: which keys exist where, and how a file becomes a [`Desired`] (VIPs,
//! backends, settings), with the cross-field rules (unique keys, families, capacity).

use std::collections::HashMap;

use lb_common::{DEFAULT_FLOW_TABLE_SIZE, MAX_BACKENDS, MAX_TABLES, MAX_VIPS};
use marked_yaml::Node;

use super::yaml::{Checker, Field, node_line};
use super::{FLOW_TABLE_HINT, FLOW_TABLE_SIZES, NEW_FLOWS_HINT, PORT_HINT, Result, WEIGHT_HINT};
use crate::model::{
    Backend, CheckProtocol, DEFAULT_WEIGHT, Desired, FlowState, ForwardingMode, HealthCheck, IpNet,
    KUBE_PROXY_HEALTHZ_PORT, MAX_WEIGHT, Protocol, Settings, Vip, VipAddr, parse_duration,
};

pub(super) const TOP_KEYS: &[&str] = &[
    "maglev_table_size",
    "flow_table_size",
    "encap_source_v4",
    "encap_source_v6",
    "max_new_flows_per_cpu",
    "flow_state",
    "peers",
    "vips",
];
pub(super) const VIP_KEYS: &[&str] = &[
    "address",
    "port",
    "protocol",
    "mode",
    "session_affinity",
    "source_ranges",
    "backends",
    "health_check",
];
pub(super) const HEALTH_CHECK_KEYS: &[&str] = &[
    "protocol", "port", "path", "interval", "timeout", "fall", "rise",
];
/// Most client prefixes of one VIP (the trie holds all VIPs' prefixes).
pub(super) const MAX_SOURCE_RANGES_PER_VIP: usize = 1024;
pub(super) const BACKEND_KEYS: &[&str] = &["address", "mac", "weight", "drain"];

impl Checker<'_> {
    pub(super) fn desired(&self, root: &Node) -> Result<Desired> {
        // A key missing from an empty file is missing from its first line.
        let line = match root.as_mapping() {
            Some(top) if !top.is_empty() => node_line(root),
            _ => Some(1),
        };
        let root = Field {
            node: root,
            path: String::new(),
            line,
        };
        let top = self.fields(&root, TOP_KEYS)?;
        let settings = Settings {
            maglev_table_size: match top.get("maglev_table_size") {
                Some(field) => Some(self.maglev_table_size(&field)?),
                None => None,
            },
            flow_table_size: match top.get("flow_table_size") {
                Some(field) => self.number(&field, FLOW_TABLE_SIZES, FLOW_TABLE_HINT)?,
                None => DEFAULT_FLOW_TABLE_SIZE,
            },
            encap_source_v4: match top.get("encap_source_v4") {
                Some(field) => match self.prefix(&field, Some(4))? {
                    IpNet::V4(net) => Some(net),
                    IpNet::V6(_) => None, // The family was checked.
                },
                None => None,
            },
            encap_source_v6: match top.get("encap_source_v6") {
                Some(field) => match self.prefix(&field, Some(6))? {
                    IpNet::V6(net) => Some(net),
                    IpNet::V4(_) => None,
                },
                None => None,
            },
            max_new_flows_per_cpu: match top.get("max_new_flows_per_cpu") {
                Some(field) => self.number(&field, 0..=u32::MAX, NEW_FLOWS_HINT)?,
                None => lb_common::DEFAULT_MAX_NEW_FLOWS_PER_CPU,
            },
            flow_state: match top.get("flow_state") {
                Some(field) => {
                    const HINT: &str = "use table (a connection-table entry per flow), \
                         second-chance (no entry; needs conntrack on every node) or auto \
                         (second chance where this node's conntrack tracks its connections)";
                    let text = self.text(&field, "table, second-chance or auto", HINT)?;
                    text.parse::<FlowState>().map_err(|_| {
                        self.error_at(&field, format!("unknown flow_state {text:?}"), HINT)
                    })?
                }
                None => FlowState::Table,
            },
        };

        let mut peers = std::collections::BTreeSet::new();
        if let Some(field) = top.get("peers") {
            let items = self.list(
                &field,
                "write one `- <address>` line per node that runs sluice too",
            )?;
            for item in &items {
                peers.insert(self.unicast_addr(item)?);
            }
        }

        let vips_field = self.require(
            &top,
            "vips",
            "add `vips:` with one `- address: ...` entry per VIP (`vips: []` serves none)",
        )?;
        let items = self.list(&vips_field, "write one `- address: ...` entry per VIP")?;
        let mut vips = Vec::with_capacity(items.len());
        let mut seen = HashMap::new();
        let mut room = Room::default();
        for item in &items {
            if vips.len() == MAX_VIPS as usize {
                return Err(self.error_at(
                    item,
                    format!("more than {MAX_VIPS} VIPs"),
                    "that is all one load balancer serves; spread the VIPs over several",
                ));
            }
            let vip = self.vip(item, &settings, &mut room)?;
            self.unique(
                &mut seen,
                vip.key,
                item,
                "list each address, port and protocol once; merge their backends",
            )?;
            vips.push(vip);
        }
        vips.sort_unstable_by_key(|vip| vip.key);
        Ok(Desired {
            settings,
            vips,
            peers,
        })
    }

    pub(super) fn vip(
        &self,
        item: &Field<'_>,
        settings: &Settings,
        room: &mut Room,
    ) -> Result<Vip> {
        let fields = self.fields(item, VIP_KEYS)?;
        let addr = self.unicast_addr(&self.require(
            &fields,
            "address",
            "add `address: <IPv4 or IPv6 address>`, the address clients connect to",
        )?)?;
        let port = self.number(
            &self.require(&fields, "port", "add `port: <1-65535>`")?,
            1..=65535,
            PORT_HINT,
        )?;
        let protocol = match fields.get("protocol") {
            Some(field) => self.protocol(&field)?,
            None => Protocol::Tcp,
        };
        let key = VipAddr {
            addr,
            port: port as u16, // In 1..=65535.
            protocol,
        };
        let mode = match fields.get("mode") {
            Some(field) => {
                const HINT: &str = "use l2 (backends on this L2 segment) or ipip (backends \
                     across L3, running `sluice decap`)";
                let text = self.text(&field, "l2 or ipip", HINT)?;
                text.parse::<ForwardingMode>()
                    .map_err(|_| self.error_at(&field, format!("unknown mode {text:?}"), HINT))?
            }
            None => ForwardingMode::L2,
        };
        let client_affinity = match fields.get("session_affinity") {
            Some(field) => {
                const HINT: &str = "use none or client_ip (as a Service's sessionAffinity)";
                match self.text(&field, "none or client_ip", HINT)? {
                    "none" | "None" => false,
                    "client_ip" | "ClientIP" => true,
                    text => {
                        return Err(self.error_at(
                            &field,
                            format!("unknown session affinity {text:?}"),
                            HINT,
                        ));
                    }
                }
            }
            None => false,
        };
        let family = if addr.is_ipv4() { 4 } else { 6 };
        let mut source_ranges = Vec::new();
        if let Some(field) = fields.get("source_ranges") {
            let items = self.list(&field, "write one `- <prefix>` line per client range")?;
            if items.len() > MAX_SOURCE_RANGES_PER_VIP {
                return Err(self.error_at(
                    &field,
                    format!("more than {MAX_SOURCE_RANGES_PER_VIP} source ranges"),
                    "merge adjacent prefixes into shorter ones",
                ));
            }
            for item in &items {
                source_ranges.push(self.prefix(item, Some(family))?);
            }
            source_ranges.sort_unstable();
            source_ranges.dedup();
        }

        let backends_field = self.require(
            &fields,
            "backends",
            "add `backends:` with one `- address: ...` entry per backend \
             (`backends: []` drops the VIP's traffic)",
        )?;
        let items = self.list(
            &backends_field,
            "write one `- address: ...` entry per backend",
        )?;
        let mut backends = Vec::with_capacity(items.len());
        let mut seen = HashMap::new();
        let mut taking_new_flows = 0;
        for item in &items {
            let backend = self.backend(item)?;
            if room.backends.len() == MAX_BACKENDS as usize
                && !room.backends.contains(&(backend.addr, mode))
            {
                return Err(self.error_at(
                    item,
                    format!("more than {MAX_BACKENDS} distinct backends"),
                    "that is the size of the backend table (VIPs share a backend's entry); \
                     spread the VIPs over several load balancers",
                ));
            }
            room.backends.insert((backend.addr, mode));
            self.unique(
                &mut seen,
                backend.addr,
                item,
                "list each backend once per VIP; give it a larger weight for more flows",
            )?;
            if mode == ForwardingMode::L2 && backend.addr.is_ipv4() != addr.is_ipv4() {
                return Err(self.error_at(
                    item,
                    format!(
                        "backend {} is not of the VIP's family, which mode l2 needs",
                        backend.addr
                    ),
                    "use `mode: ipip` to reach backends of the other family, or a backend \
                     address of the VIP's family",
                ));
            }
            if backend.takes_new_flows() {
                taking_new_flows += 1;
                if let Some(size) = settings.maglev_table_size
                    && taking_new_flows > size
                {
                    return Err(self.error_at(
                        item,
                        format!(
                            "{taking_new_flows} backends take new flows but maglev_table_size \
                             is only {size}"
                        ),
                        "raise maglev_table_size to a prime over 100 times the number of backends",
                    ));
                }
            }
            backends.push(backend);
        }
        backends.sort_unstable_by_key(|backend| backend.addr);
        // VIPs with the same backends and weights share a Maglev table.
        let set = crate::model::table_key(mode, &backends);
        if room.tables.len() == MAX_TABLES as usize && !room.tables.contains(&set) {
            return Err(self.error_at(
                item,
                format!("more than {MAX_TABLES} distinct sets of backends and weights"),
                "VIPs with the same backends and weights share a Maglev table, other sets need \
                 their own; spread the VIPs over several load balancers",
            ));
        }
        room.tables.insert(set);
        let health_check = fields
            .get("health_check")
            .map(|field| self.health_check(&field))
            .transpose()?;
        Ok(Vip {
            key,
            backends: backends.into(),
            mode,
            client_affinity,
            source_ranges,
            health_check,
        })
    }

    /// `health_check: {protocol: http|tcp, port, path, interval, timeout, fall, rise}` (all but
    /// protocol optional: port 10256, path /healthz, 1s, 500ms, 3, 2).
    pub(super) fn health_check(&self, item: &Field<'_>) -> Result<HealthCheck> {
        const HINT: &str = "e.g. `health_check: {protocol: http, port: 10256, path: /healthz, \
             interval: 1s, timeout: 500ms, fall: 3, rise: 2}` (all but protocol optional)";
        let fields = self.fields(item, HEALTH_CHECK_KEYS)?;
        let protocol_field = self.require(&fields, "protocol", "add `protocol: http` or `tcp`")?;
        let protocol = match self.text(&protocol_field, "http or tcp", HINT)? {
            "http" => CheckProtocol::Http,
            "tcp" => CheckProtocol::Tcp,
            other => {
                return Err(self.error_at(
                    &protocol_field,
                    format!("unknown protocol {other:?}"),
                    "use http (GET, 2xx/3xx passes) or tcp (a connection passes)",
                ));
            }
        };
        let port = match fields.get("port") {
            Some(field) => self.number(&field, 1..=65535, PORT_HINT)? as u16,
            None => KUBE_PROXY_HEALTHZ_PORT,
        };
        let path = match fields.get("path") {
            Some(field) => self.text(&field, "a path like /healthz", HINT)?.to_owned(),
            None => "/healthz".to_owned(),
        };
        let mut check = HealthCheck::new(protocol, port, &path);
        for (key, slot) in [
            ("interval", &mut check.interval),
            ("timeout", &mut check.timeout),
        ] {
            if let Some(field) = fields.get(key) {
                let text = self.text(&field, "a duration like 500ms or 1s", HINT)?;
                *slot = parse_duration(text).map_err(|e| self.error_at(&field, e, HINT))?;
            }
        }
        for (key, slot) in [("fall", &mut check.fall), ("rise", &mut check.rise)] {
            if let Some(field) = fields.get(key) {
                *slot = self.number(&field, 1..=100, "consecutive results: 1 to 100")?;
            }
        }
        check.validate().map_err(|e| self.error_at(item, e, HINT))?;
        Ok(check)
    }

    pub(super) fn backend(&self, item: &Field<'_>) -> Result<Backend> {
        let fields = self.fields(item, BACKEND_KEYS)?;
        let addr = self.unicast_addr(&self.require(
            &fields,
            "address",
            "add `address: <IPv4 or IPv6 address>` of the backend",
        )?)?;
        let mac = fields
            .get("mac")
            .map(|field| self.mac(&field))
            .transpose()?;
        let weight = match fields.get("weight") {
            Some(field) => self.number(&field, 0..=MAX_WEIGHT, WEIGHT_HINT)?,
            None => DEFAULT_WEIGHT,
        };
        let drain = match fields.get("drain") {
            Some(field) => self.boolean(
                &field,
                "write true (keep established flows, take no new ones) or false",
            )?,
            None => false,
        };
        Ok(Backend {
            addr,
            mac,
            weight,
            drain,
        })
    }
}

/// What one load balancer's maps hold, counted over the VIPs read so far: distinct backends
/// (one entry each, shared by the VIPs) and distinct backend sets (one Maglev table each).
#[derive(Default)]
pub(super) struct Room {
    backends: std::collections::HashSet<(std::net::IpAddr, ForwardingMode)>,
    tables: std::collections::HashSet<crate::model::TableKey>,
}
