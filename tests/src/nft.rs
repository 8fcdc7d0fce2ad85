//! nftables counters on each backend: the proof that VIP packets came through XDP.
//!
//! The XDP program rewrites MAC addresses and sends the frame back out (XDP_TX): it leaves the IP TTL
//! as the client set it (64). A packet that the load balancer's kernel routed instead arrives with
//! TTL 63. Each backend counts VIP packets by TTL in its input hook.

use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{Context, Result, anyhow};

use crate::cmd;

/// The table the lab installs in every backend namespace.
pub const TABLE: &str = "sluicelab";

/// Counters of VIP traffic seen by one backend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VipCounters {
    /// VIP packets with TTL 64 (forwarded by XDP, or sent from the same L2 segment).
    pub ttl64: u64,
    /// VIP packets with any other TTL (routed by a kernel on the way).
    pub ttl_other: u64,
    /// TCP SYNs (without ACK) to the VIP: new connections.
    pub syn: u64,
    /// UDP datagrams to the VIP.
    pub udp: u64,
}

impl VipCounters {
    pub fn packets(&self) -> u64 {
        self.ttl64 + self.ttl_other
    }
}

/// The ruleset text (for `nft -f`).
pub fn ruleset(vip: Ipv4Addr) -> String {
    format!(
        "table inet {TABLE} {{
  counter vip_ttl64 {{ }}
  counter vip_ttl_other {{ }}
  counter vip_syn {{ }}
  counter vip_udp {{ }}
  chain input {{
    type filter hook input priority 0; policy accept;
    ip daddr {vip} ip ttl 64 counter name vip_ttl64
    ip daddr {vip} ip ttl != 64 counter name vip_ttl_other
    ip daddr {vip} tcp flags & (syn | ack) == syn counter name vip_syn
    ip daddr {vip} meta l4proto udp counter name vip_udp
  }}
}}
"
    )
}

/// Reads the counters of namespace `ns`.
pub fn read(ns: &str) -> Result<VipCounters> {
    let out = cmd::run_ok(
        Command::new("ip").args([
            "netns", "exec", ns, "nft", "-j", "list", "counters", "table", "inet", TABLE,
        ]),
        cmd::DEFAULT_TIMEOUT,
    )?;
    parse(&String::from_utf8_lossy(&out.stdout))
        .with_context(|| format!("reading nft counters in {ns}"))
}

/// Zeroes the counters of namespace `ns`.
pub fn reset(ns: &str) -> Result<()> {
    cmd::run_ok(
        Command::new("ip").args([
            "netns", "exec", ns, "nft", "reset", "counters", "table", "inet", TABLE,
        ]),
        cmd::DEFAULT_TIMEOUT,
    )?;
    Ok(())
}

/// Parses `nft -j list counters` output.
pub fn parse(json: &str) -> Result<VipCounters> {
    let v: serde_json::Value = serde_json::from_str(json).context("nft -j output is not JSON")?;
    let items = v
        .get("nftables")
        .and_then(|x| x.as_array())
        .ok_or_else(|| anyhow!("nft -j output has no \"nftables\" array"))?;
    let mut c = VipCounters::default();
    let mut found = 0;
    for item in items {
        let Some(counter) = item.get("counter") else {
            continue;
        };
        let name = counter.get("name").and_then(|n| n.as_str()).unwrap_or("");
        let packets = counter.get("packets").and_then(|p| p.as_u64()).unwrap_or(0);
        let slot = match name {
            "vip_ttl64" => &mut c.ttl64,
            "vip_ttl_other" => &mut c.ttl_other,
            "vip_syn" => &mut c.syn,
            "vip_udp" => &mut c.udp,
            _ => continue,
        };
        *slot = packets;
        found += 1;
    }
    if found != 4 {
        return Err(anyhow!(
            "expected 4 counters in table inet {TABLE}, found {found}: {json}"
        ));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
          {"counter": {"family": "inet", "name": "vip_ttl64", "table": "sluicelab", "handle": 1, "packets": 7, "bytes": 420}},
          {"counter": {"family": "inet", "name": "vip_ttl_other", "table": "sluicelab", "handle": 2, "packets": 1, "bytes": 60}},
          {"counter": {"family": "inet", "name": "vip_syn", "table": "sluicelab", "handle": 3, "packets": 2, "bytes": 120}},
          {"counter": {"family": "inet", "name": "vip_udp", "table": "sluicelab", "handle": 4, "packets": 0, "bytes": 0}}]}"#;
        let c = parse(json).unwrap();
        assert_eq!(
            c,
            VipCounters {
                ttl64: 7,
                ttl_other: 1,
                syn: 2,
                udp: 0
            }
        );
        assert_eq!(c.packets(), 8);
    }
}
