//! `sluice inspect bgp`: the BGP sessions of an agent, read from its `GET /bgp` (bgp/view.rs
//! serves them) and shown as a table or JSON.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;

use super::render::{View, render_table};
use crate::bgp::view::{BgpView, PATH, PeerView};
use crate::http;

/// How long `sluice inspect bgp` waits for the agent.
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// `sluice inspect bgp`: the sessions of the agent whose health address is `agent`.
pub fn fetch(agent: &str) -> anyhow::Result<View> {
    let addr: SocketAddr = agent.parse().map_err(|e| {
        anyhow::anyhow!("--agent {agent:?}: {e}: expected the agent's --health-addr, ADDRESS:PORT")
    })?;
    let body = http::fetch(addr, PATH, FETCH_TIMEOUT).with_context(|| {
        format!(
            "no agent answers at http://{addr}{PATH}: is `sluice agent` running with --health-addr {addr} (in this network namespace)? Choose it with --agent"
        )
    })?;
    from_answer(addr, &body)
}

/// The view of the agent at `addr`'s `/bgp` answer `body`.
fn from_answer(addr: SocketAddr, body: &str) -> anyhow::Result<View> {
    let view: BgpView = serde_json::from_str(body)
        .with_context(|| format!("http://{addr}{PATH} did not answer with BGP sessions"))?;
    anyhow::ensure!(
        view.enabled,
        "the agent at {addr} runs without BGP (start it with --bgp)"
    );
    Ok(render(&view))
}

/// The sessions as JSON and as a table.
pub fn render(view: &BgpView) -> View {
    let header = [
        "PEER",
        "ASN",
        "LOCAL ASN",
        "STATE",
        "UPTIME",
        "PREFIXES",
        "BFD",
        "MD5",
        "OPTIONS",
        "LAST ERROR",
    ];
    let rows = view.peers.iter().map(|p| {
        vec![
            SocketAddr::new(p.address, p.port).to_string(),
            p.asn.to_string(),
            p.local_asn.to_string(),
            p.state.clone(),
            uptime(p.uptime_seconds),
            p.prefixes_announced.to_string(),
            p.bfd.clone(),
            if p.md5 { "on" } else { "off" }.to_owned(),
            options(p),
            last_error(p),
        ]
    });
    let mut table = render_table(&header, rows);
    if view.peers.is_empty() {
        table.push_str("(no BGP peers: neither --bgp-peers nor a BGPPeer selects this node)\n");
    }
    View {
        json: serde_json::to_value(view).unwrap_or_default(),
        table,
    }
}

/// `1h02m03s`, `4m05s`, `6s`; `-` for a session that is not up.
fn uptime(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (secs, h, m) {
        (0, _, _) => "-".to_owned(),
        (_, 0, 0) => format!("{s}s"),
        (_, 0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// The settings beside the defaults: `source ADDR`, `multihop N`, `gtsm N`, `hold Ns`.
fn options(p: &PeerView) -> String {
    let mut out = Vec::new();
    if let Some(a) = p.source {
        out.push(format!("source {a}"));
    }
    if let Some(n) = p.ebgp_multihop {
        out.push(format!("multihop {n}"));
    }
    if let Some(n) = p.ttl_security_hops {
        out.push(format!("gtsm {n}"));
    }
    if let Some(n) = p.hold_time_seconds {
        out.push(format!("hold {n}s"));
    }
    if out.is_empty() {
        "-".to_owned()
    } else {
        out.join(", ")
    }
}

/// `reason: words`, or `-`.
fn last_error(p: &PeerView) -> String {
    match (&p.last_reason, &p.last_error) {
        (Some(r), Some(e)) => format!("{r}: {e}"),
        (None, Some(e)) => e.clone(),
        (Some(r), None) => r.clone(),
        (None, None) => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_peers() -> BgpView {
        serde_json::from_value(serde_json::json!({
            "enabled": true,
            "peers": [
                {"address": "192.0.2.1", "port": 179, "asn": 65000, "local_asn": 64512,
                 "state": "established", "uptime_seconds": 3723, "prefixes_announced": 1,
                 "failures": 0, "last_error": null, "last_reason": null, "bfd": "up", "md5": false,
                 "source": "192.0.2.10", "ebgp_multihop": null, "ttl_security_hops": 1,
                 "hold_time_seconds": null},
                {"address": "2001:db8::1", "port": 179, "asn": 65001, "local_asn": 64512,
                 "state": "down", "uptime_seconds": 0, "prefixes_announced": 0, "failures": 2,
                 "last_error": "no answer (TCP-MD5 password?)", "last_reason": "no_answer_tcp_md5",
                 "bfd": "off", "md5": true, "source": null, "ebgp_multihop": 2,
                 "ttl_security_hops": null, "hold_time_seconds": null},
            ],
        }))
        .unwrap()
    }

    #[test]
    fn the_table_has_a_row_per_peer_with_its_state_and_settings() {
        let v = render(&two_peers());
        let lines: Vec<&str> = v.table.lines().collect();
        assert_eq!(lines.len(), 3, "{}", v.table);
        for (line, cells) in [
            (
                lines[1],
                &[
                    "192.0.2.1:179",
                    "65000",
                    "established",
                    "1h02m03s",
                    "up",
                    "source 192.0.2.10, gtsm 1",
                ][..],
            ),
            (
                lines[2],
                &[
                    "[2001:db8::1]:179",
                    "65001",
                    "down",
                    "off",
                    "on",
                    "multihop 2",
                    "no_answer_tcp_md5: no answer (TCP-MD5 password?)",
                ][..],
            ),
        ] {
            for cell in cells {
                assert!(line.contains(cell), "no {cell:?} in {line:?}");
            }
        }
        assert_eq!(v.json["peers"][1]["state"], "down");
    }

    /// An agent without `--bgp` answers `enabled: false`; the CLI names it and its address.
    #[test]
    fn an_agent_without_bgp_or_without_an_answer_is_named() {
        let addr: SocketAddr = "127.0.0.1:9941".parse().unwrap();
        let off = r#"{"enabled": false, "peers": []}"#;
        let e = from_answer(addr, off).err().unwrap().to_string();
        assert_eq!(
            e,
            "the agent at 127.0.0.1:9941 runs without BGP (start it with --bgp)"
        );
        let e = format!("{:#}", from_answer(addr, "ok\n").err().unwrap());
        assert!(
            e.contains("http://127.0.0.1:9941/bgp did not answer"),
            "{e}"
        );
        let on = r#"{"enabled": true, "peers": []}"#;
        assert!(
            from_answer(addr, on)
                .unwrap()
                .table
                .contains("no BGP peers")
        );
    }

    #[test]
    fn uptime_reads_as_hours_minutes_seconds() {
        assert_eq!(uptime(0), "-");
        assert_eq!(uptime(7), "7s");
        assert_eq!(uptime(65), "1m05s");
        assert_eq!(uptime(3600), "1h00m00s");
    }
}
