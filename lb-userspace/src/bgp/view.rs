//! `GET /bgp` on the agent's health address: the BGP sessions live in the agent process (not
//! in maps), so the agent serves them as JSON and `sluice inspect bgp` (observe/bgp.rs) reads
//! them from there. Per peer: its address and AS, the session's state, uptime and prefixes, the
//! last error and its reason, BFD's state, and the settings that decide whether a router
//! accepts the session (TCP-MD5 on or off, never the password; source, multihop, GTSM).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::BgpMetrics;
use super::bfd::Link;
use super::metrics::SessionView;
use crate::http;

/// Where the agent serves the sessions.
pub const PATH: &str = "/bgp";

/// What `/bgp` answers: `enabled` false when the agent runs without `--bgp`.
#[derive(Debug, Serialize, Deserialize)]
pub struct BgpView {
    pub enabled: bool,
    pub peers: Vec<PeerView>,
}

/// One peer's session.
#[derive(Debug, Serialize, Deserialize)]
pub struct PeerView {
    pub address: IpAddr,
    pub port: u16,
    pub asn: u32,
    pub local_asn: u32,
    /// `established`, `connecting` (not failed yet), `down` (failed; retrying) or `closed`.
    pub state: String,
    pub uptime_seconds: u64,
    pub prefixes_announced: usize,
    /// Failed sessions since the agent started.
    pub failures: u64,
    pub last_error: Option<String>,
    /// The last error's `/metrics` reason (`no_answer_tcp_md5`, `hold_timer`, ...).
    pub last_reason: Option<String>,
    /// `off`, `waiting` (not up yet), `up`, `down` (the path failed) or `admin_down`.
    pub bfd: String,
    /// A TCP-MD5 password is set (the password itself is never shown).
    pub md5: bool,
    pub source: Option<IpAddr>,
    pub ebgp_multihop: Option<u8>,
    pub ttl_security_hops: Option<u8>,
    /// The hold time this node proposes, seconds.
    pub hold_time_seconds: Option<u16>,
}

impl PeerView {
    fn of(s: SessionView) -> PeerView {
        let state = if s.established {
            "established"
        } else if s.closed {
            "closed"
        } else if s.failures > 0 {
            "down"
        } else {
            "connecting"
        };
        let bfd = match s.bfd {
            None => "off",
            Some(Link::Waiting) => "waiting",
            Some(Link::Up) => "up",
            Some(Link::Failed) => "down",
            Some(Link::AdminDown) => "admin_down",
        };
        let o = &s.settings.options;
        PeerView {
            address: s.settings.addr,
            port: s.settings.port,
            asn: s.settings.asn,
            local_asn: s.local_asn,
            state: state.to_owned(),
            uptime_seconds: s.uptime_secs,
            prefixes_announced: s.prefixes,
            failures: s.failures,
            last_error: s.last_error,
            last_reason: s.last_reason.map(|r| r.label().to_owned()),
            bfd: bfd.to_owned(),
            md5: o.password.is_some(),
            source: o.source,
            ebgp_multihop: o.ebgp_multihop,
            ttl_security_hops: o.ttl_security_hops,
            hold_time_seconds: o.hold_time_secs,
        }
    }
}

/// The sessions as `/bgp` answers them (`None`: the agent runs without BGP).
pub fn view(bgp: Option<&BgpMetrics>) -> BgpView {
    BgpView {
        enabled: bgp.is_some(),
        peers: bgp
            .map(|b| b.sessions().into_iter().map(PeerView::of).collect())
            .unwrap_or_default(),
    }
}

/// The `/bgp` handler for the agent's health server.
pub fn handler(bgp: Option<BgpMetrics>) -> http::Handler {
    Box::new(move || match serde_json::to_string(&view(bgp.as_ref())) {
        Ok(body) => http::Reply {
            status: 200,
            content_type: "application/json",
            body,
        },
        Err(e) => http::Reply::text(500, format!("writing the BGP sessions as JSON: {e}\n")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::metrics::Reason;
    use crate::bgp::{Password, Peer};

    fn session(peer: Peer, established: bool, bfd: Option<Link>) -> SessionView {
        SessionView {
            peer: peer.to_string(),
            settings: peer,
            local_asn: 64512,
            bfd,
            established,
            closed: false,
            uptime_secs: if established { 3723 } else { 0 },
            prefixes: usize::from(established),
            failures: if established { 0 } else { 2 },
            last_error: (!established).then(|| "no answer (TCP-MD5 password?)".to_owned()),
            last_reason: (!established).then_some(Reason::NoAnswerWithMd5),
        }
    }

    /// Every field a router's operator needs, and the password only as "md5: true".
    #[test]
    fn peers_show_state_and_settings_but_never_the_password() {
        let mut up = Peer::new("192.0.2.1".parse().unwrap(), 179, 65000);
        up.options.bfd = true;
        up.options.ttl_security_hops = Some(1);
        up.options.source = Some("192.0.2.10".parse().unwrap());
        let mut down = Peer::new("2001:db8::1".parse().unwrap(), 179, 65001);
        down.options.password = Some(Password::new("s3cret-pw").unwrap());
        down.options.ebgp_multihop = Some(2);
        let view = BgpView {
            enabled: true,
            peers: vec![
                PeerView::of(session(up, true, Some(Link::Up))),
                PeerView::of(session(down, false, None)),
            ],
        };
        let json = serde_json::to_value(&view).unwrap();
        assert!(!json.to_string().contains("s3cret"), "{json}");
        let peers = &json["peers"];
        assert_eq!(peers[0]["state"], "established");
        assert_eq!(peers[0]["bfd"], "up");
        assert_eq!(peers[0]["prefixes_announced"], 1);
        assert_eq!(peers[0]["md5"], false);
        assert_eq!(peers[0]["ttl_security_hops"], 1);
        assert_eq!(peers[0]["source"], "192.0.2.10");
        assert_eq!(peers[1]["address"], "2001:db8::1");
        assert_eq!(peers[1]["state"], "down");
        assert_eq!(peers[1]["bfd"], "off");
        assert_eq!(peers[1]["md5"], true);
        assert_eq!(peers[1]["ebgp_multihop"], 2);
        assert_eq!(peers[1]["last_reason"], "no_answer_tcp_md5");
        // The JSON reads back (what `sluice inspect bgp` does with the agent's answer).
        let back: BgpView = serde_json::from_value(json).unwrap();
        assert_eq!(back.peers.len(), 2);
    }

    /// An agent without `--bgp` answers `enabled: false`.
    #[test]
    fn an_agent_without_bgp_says_so() {
        let off = view(None);
        assert!(!off.enabled && off.peers.is_empty());
        assert!(view(Some(&BgpMetrics::default())).enabled);
    }
}
