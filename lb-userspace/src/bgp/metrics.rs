//! The BGP speaker's instruments: each session's state by peer (`sluice_bgp_session_up`,
//! `_uptime_seconds`, `_failures_total`, `sluice_bgp_prefixes_announced`, and for `/readyz` the
//! last error of a session that is down), and BFD datagrams dropped, by reason
//! (`sluice_bfd_drops_total`). The sessions and the BFD task keep them as they happen;
//! `/metrics` composes them on each scrape.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::watch;

use super::Peer;
use super::bfd::{Drops, Link};
use super::session::Status;

type Labels = Vec<(&'static str, String)>;

/// Why a session failed last, as `sluice_bgp_session_last_error`'s `reason` label: a fixed
/// set, so that the series stay few whatever the peer does (the words are in the log and
/// `/readyz`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The socket could not be set up (source address, TCP-MD5 key, TTL).
    SocketSetup,
    ConnectRefused,
    ConnectFailed,
    /// No answer to the SYN within the connect timeout.
    NoAnswer,
    /// The same with a TCP-MD5 password configured: the mark of a password mismatch (the
    /// kernels drop segments signed with another key, or unsigned, without a word).
    NoAnswerWithMd5,
    NoOpen,
    /// The peer sent a NOTIFICATION instead of its OPEN (its configuration refuses ours).
    PeerRefused,
    /// We refused the peer's OPEN (AS, version, hold time).
    OpenRefused,
    HoldTimer,
    Bfd,
    /// The peer ended an established session with a NOTIFICATION.
    PeerClosed,
    ConnectionLost,
    Malformed,
    SendFailed,
    Unexpected,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::SocketSetup => "socket_setup",
            Reason::ConnectRefused => "connect_refused",
            Reason::ConnectFailed => "connect_failed",
            Reason::NoAnswer => "no_answer",
            Reason::NoAnswerWithMd5 => "no_answer_tcp_md5",
            Reason::NoOpen => "no_open",
            Reason::PeerRefused => "peer_refused",
            Reason::OpenRefused => "open_refused",
            Reason::HoldTimer => "hold_timer",
            Reason::Bfd => "bfd",
            Reason::PeerClosed => "peer_closed",
            Reason::ConnectionLost => "connection_lost",
            Reason::Malformed => "malformed",
            Reason::SendFailed => "send_failed",
            Reason::Unexpected => "unexpected",
        }
    }
}
/// A session followed: its peer's settings, its status channel and its BFD link's.
#[derive(Debug)]
struct Followed {
    peer: Peer,
    /// This node's AS towards the peer (the peer's or the speaker's).
    local_asn: u32,
    status: watch::Receiver<Status>,
    /// BFD's verdict on the path (`None`: no BFD with this peer).
    bfd: Option<watch::Receiver<Link>>,
}

/// What the speaker counts for `/metrics`. Clones share their counts.
#[derive(Clone, Debug, Default)]
pub struct BgpMetrics {
    /// BFD's drop counters (the BFD task counts into these).
    pub bfd_drops: Arc<Drops>,
    /// Each session, in the order the speaker started them.
    sessions: Arc<Mutex<Vec<Followed>>>,
}

/// One session as `/metrics`, `/readyz` and `/bgp` show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionView {
    /// The peer as the `peer` label and the log write it (`ADDRESS:PORT (AS N)`).
    pub peer: String,
    /// The peer's settings (its password stays hidden: [`super::Password`]).
    pub settings: Peer,
    pub local_asn: u32,
    /// BFD's verdict on the path; `None`: no BFD with this peer.
    pub bfd: Option<Link>,
    pub established: bool,
    /// Closed for good (the peer is no longer configured, or the agent stops).
    pub closed: bool,
    pub uptime_secs: u64,
    pub prefixes: usize,
    pub failures: u64,
    pub last_error: Option<String>,
    pub last_reason: Option<Reason>,
}

impl BgpMetrics {
    /// Follows a session's status from now on (the speaker calls it once per peer).
    pub(super) fn add_session(
        &self,
        peer: &Peer,
        local_asn: u32,
        status: watch::Receiver<Status>,
        bfd: Option<watch::Receiver<Link>>,
    ) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.push(Followed {
                peer: peer.clone(),
                local_asn,
                status,
                bfd,
            });
        }
    }

    /// Stops following a peer's session (it was closed for good).
    pub(super) fn remove_session(&self, peer: &Peer) {
        if let Ok(mut sessions) = self.sessions.lock() {
            sessions.retain(|f| f.peer != *peer);
        }
    }

    /// Every session as it is now, in the peers' order.
    pub fn sessions(&self) -> Vec<SessionView> {
        let Ok(sessions) = self.sessions.lock() else {
            return Vec::new();
        };
        sessions
            .iter()
            .map(|f| {
                let s = f.status.borrow();
                SessionView {
                    peer: f.peer.to_string(),
                    settings: f.peer.clone(),
                    local_asn: f.local_asn,
                    bfd: f.bfd.as_ref().map(|l| *l.borrow()),
                    established: s.established,
                    closed: s.closed,
                    uptime_secs: s.up_since.map_or(0, |t| t.elapsed().as_secs()),
                    prefixes: s.sent.as_ref().map_or(0, |r| r.0.len()),
                    failures: s.failures,
                    last_error: s.last_error.clone(),
                    last_reason: s.last_reason,
                }
            })
            .collect()
    }

    /// `/readyz` lines: one per session that is not established, with its last error. The
    /// agent stays ready (its dataplane forwards; a router's outage is not the node's), but the
    /// line says why the routes are not where they should be.
    pub fn degraded_lines(&self) -> Vec<String> {
        self.sessions()
            .into_iter()
            .filter(|s| !s.established)
            .map(|s| {
                format!(
                    "BGP peer {}: not established ({} failed sessions; last error: {})",
                    s.peer,
                    s.failures,
                    s.last_error.as_deref().unwrap_or("none yet")
                )
            })
            .collect()
    }

    /// Registers the sessions' gauges and counters by `peer` (one label value per configured
    /// peer) and `bfd_drops` (a counter by `reason`: `ttl`, `malformed`, `unknown_source`,
    /// `wrong_discriminator`; four label values at most).
    pub fn register(&self, registry: &mut Registry) {
        let up = Family::<Labels, Gauge>::default();
        let uptime = Family::<Labels, Gauge>::default();
        let prefixes = Family::<Labels, Gauge>::default();
        let failures = Family::<Labels, Counter>::default();
        let last_error = Family::<Labels, Gauge>::default();
        registry.register(
            "bgp_session_up",
            "1 while the BGP session with the peer is established",
            up.clone(),
        );
        registry.register(
            "bgp_session_uptime_seconds",
            "Seconds since the BGP session was established (0 while it is not)",
            uptime.clone(),
        );
        registry.register(
            "bgp_prefixes_announced",
            "Prefixes this node announces to the peer (sent and in its table)",
            prefixes.clone(),
        );
        registry.register(
            "bgp_session_failures",
            "BGP sessions with the peer that failed (connection refused or lost, hold timer, \
             NOTIFICATION, BFD) since the agent started",
            failures.clone(),
        );
        registry.register(
            "bgp_session_last_error",
            "1 with the reason the last failed BGP session with the peer failed (one series per \
             peer that has failed: no_answer_tcp_md5 is a TCP-MD5 password mismatch or a silent \
             peer; the words are in the log and /readyz)",
            last_error.clone(),
        );
        for s in self.sessions() {
            let labels = vec![("peer", s.peer.clone())];
            up.get_or_create(&labels).set(i64::from(s.established));
            uptime
                .get_or_create(&labels)
                .set(i64::try_from(s.uptime_secs).unwrap_or(i64::MAX));
            prefixes
                .get_or_create(&labels)
                .set(i64::try_from(s.prefixes).unwrap_or(i64::MAX));
            failures.get_or_create(&labels).inc_by(s.failures);
            if let Some(reason) = s.last_reason {
                let labels = vec![
                    ("peer", s.peer.clone()),
                    ("reason", reason.label().to_owned()),
                ];
                last_error.get_or_create(&labels).set(1);
            }
        }
        self.register_bfd(registry);
    }

    fn register_bfd(&self, registry: &mut Registry) {
        let family = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "bfd_drops",
            "BFD datagrams dropped, by reason: TTL below 255 (not a directly connected sender), \
             malformed, from an address that is no peer, for another session's discriminator",
            family.clone(),
        );
        let c = self.bfd_drops.counts();
        for (reason, value) in [
            ("ttl", c.ttl),
            ("malformed", c.malformed),
            ("unknown_source", c.unknown_source),
            ("wrong_discriminator", c.wrong_discriminator),
        ] {
            family
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc_by(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_peer(addr: &str) -> Peer {
        Peer::new(addr.parse().unwrap(), 179, 65000)
    }

    /// One series per peer: up, uptime, prefixes and failures from the session's status; a
    /// session that is down is a `/readyz` line with its last error, an established one none.
    #[test]
    fn sessions_are_exported_by_peer_and_down_ones_named_for_readyz() {
        let metrics = BgpMetrics::default();
        let mut routes = super::super::Routes::new();
        for net in ["192.0.2.10/32", "192.0.2.11/32"] {
            routes
                .0
                .insert(net.parse().unwrap(), super::super::RouteAttrs::default());
        }
        let (_up_tx, up) = watch::channel(Status {
            established: true,
            up_since: Some(tokio::time::Instant::now()),
            failures: 1,
            sent: Some(routes),
            ..Status::default()
        });
        let (_down_tx, down) = watch::channel(Status {
            failures: 4,
            last_error: Some("connecting: connection refused".into()),
            last_reason: Some(Reason::ConnectRefused),
            ..Status::default()
        });
        metrics.add_session(&test_peer("192.0.2.1"), 64512, up, None);
        metrics.add_session(&test_peer("192.0.2.2"), 64512, down, None);
        let mut registry = Registry::with_prefix("sluice");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "sluice_bgp_session_up{peer=\"192.0.2.1:179 (AS 65000)\"} 1",
            "sluice_bgp_session_up{peer=\"192.0.2.2:179 (AS 65000)\"} 0",
            "sluice_bgp_prefixes_announced{peer=\"192.0.2.1:179 (AS 65000)\"} 2",
            "sluice_bgp_prefixes_announced{peer=\"192.0.2.2:179 (AS 65000)\"} 0",
            "sluice_bgp_session_failures_total{peer=\"192.0.2.1:179 (AS 65000)\"} 1",
            "sluice_bgp_session_failures_total{peer=\"192.0.2.2:179 (AS 65000)\"} 4",
            "sluice_bgp_session_uptime_seconds{peer=\"192.0.2.2:179 (AS 65000)\"} 0",
            "sluice_bgp_session_last_error{peer=\"192.0.2.2:179 (AS 65000)\",reason=\"connect_refused\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        // The established peer never failed with a reason: no series.
        assert!(!text.contains("last_error{peer=\"192.0.2.1"), "{text}");
        assert_eq!(
            metrics.degraded_lines(),
            [
                "BGP peer 192.0.2.2:179 (AS 65000): not established (4 failed sessions; last error: connecting: connection refused)"
            ]
        );
    }

    #[test]
    fn drops_are_exported_by_reason() {
        let metrics = BgpMetrics::default();
        metrics.bfd_drops.add_for_test(2, 0, 1, 3);
        let mut registry = Registry::with_prefix("sluice");
        metrics.register(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            "# TYPE sluice_bfd_drops counter",
            "sluice_bfd_drops_total{reason=\"ttl\"} 2",
            "sluice_bfd_drops_total{reason=\"malformed\"} 0",
            "sluice_bfd_drops_total{reason=\"unknown_source\"} 1",
            "sluice_bfd_drops_total{reason=\"wrong_discriminator\"} 3",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
