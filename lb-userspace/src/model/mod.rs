//! The desired state of the load balancer: what every source (the static config, Kubernetes)
//! produces and what `reconcile` consumes. Plain data, validated by whoever builds it, so that
//! nothing downstream re-checks addresses or ranges.

use std::fmt;
use std::str::FromStr;
use std::{collections::BTreeSet, net::IpAddr};

pub use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use lb_common::{DEFAULT_FLOW_TABLE_SIZE, IPPROTO_TCP, IPPROTO_UDP};
use serde::{Serialize, Serializer};

mod backends;
mod health_check;
pub use backends::{Backends, ListId};
pub use health_check::{CheckProtocol, HealthCheck, KUBE_PROXY_HEALTHZ_PORT, parse_duration};

/// A string that is not a valid [`Protocol`], [`MacAddr`] or [`VipAddr`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    what: &'static str,
    input: String,
    expected: &'static str,
}

impl ParseError {
    fn new(what: &'static str, input: &str, expected: &'static str) -> Self {
        Self {
            what,
            input: input.to_owned(),
            expected,
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} {:?}: expected {}",
            self.what, self.input, self.expected
        )
    }
}

impl std::error::Error for ParseError {}

/// L4 protocol of a VIP. Ordered as their IP protocol numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    /// IP protocol number, as in the IPv4 header and `VipKey::proto`.
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Protocol {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("tcp") {
            Ok(Self::Tcp)
        } else if s.eq_ignore_ascii_case("udp") {
            Ok(Self::Udp)
        } else {
            Err(ParseError::new("protocol", s, "tcp or udp"))
        }
    }
}

/// An Ethernet address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Group (multicast or broadcast) address: the I/G bit, the first bit on the wire, is set.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 0x01 != 0
    }

    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }

    /// An address one station can own, so a valid destination for a forwarded frame.
    pub fn is_unicast(self) -> bool {
        !self.is_multicast() && !self.is_zero()
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = ParseError;

    /// Six two-digit hex bytes separated by `:` or `-` (not mixed), in either case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || ParseError::new("MAC address", s, "six hex bytes like 02:00:00:00:00:01");
        let separator = if s.contains('-') { '-' } else { ':' };
        let mut mac = [0u8; 6];
        let mut parts = s.split(separator);
        for byte in &mut mac {
            let part = parts.next().ok_or_else(invalid)?;
            // from_str_radix alone would take "+f" or "f": insist on exactly two hex digits.
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(Self(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// What a client connects to: one VIP of the load balancer. Ordered by address, port, protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct VipAddr {
    pub addr: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
}

impl fmt::Display for VipAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(addr) => write!(f, "{addr}:{}/{}", self.port, self.protocol),
            IpAddr::V6(addr) => write!(f, "[{addr}]:{}/{}", self.port, self.protocol),
        }
    }
}

impl FromStr for VipAddr {
    type Err = ParseError;

    /// `ADDRESS:PORT[/PROTOCOL]`, as displayed; the protocol defaults to tcp like in the config.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || {
            ParseError::new(
                "VIP",
                s,
                "ADDRESS:PORT[/tcp|udp] with a port from 1 to 65535, like 10.0.0.10:80/tcp \
                 or [fd00::10]:80/tcp",
            )
        };
        let (endpoint, protocol) = match s.split_once('/') {
            Some((endpoint, protocol)) => (endpoint, protocol.parse().map_err(|_| invalid())?),
            None => (s, Protocol::Tcp),
        };
        let (addr, port) = endpoint.rsplit_once(':').ok_or_else(invalid)?;
        let addr: IpAddr = match addr.strip_prefix('[') {
            Some(v6) => IpAddr::V6(
                v6.strip_suffix(']')
                    .ok_or_else(invalid)?
                    .parse()
                    .map_err(|_| invalid())?,
            ),
            None => IpAddr::V4(addr.parse().map_err(|_| invalid())?),
        };
        let port = port
            .parse()
            .ok()
            .filter(|&port| port != 0)
            .ok_or_else(invalid)?;
        Ok(Self {
            addr,
            port,
            protocol,
        })
    }
}

/// The largest backend weight (config files, the `sluice.io/weight` node annotation).
pub const MAX_WEIGHT: u32 = 10_000;
/// A backend's weight when none is given (config `weight:`, Node annotation `sluice.io/weight`).
pub const DEFAULT_WEIGHT: u32 = 1;

/// One real server behind a VIP.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Backend {
    pub addr: IpAddr,
    /// Next-hop MAC; `None` means resolve it from the kernel's neighbour table.
    pub mac: Option<MacAddr>,
    /// Relative share of new flows; 0 takes none.
    pub weight: u32,
    /// Keeps serving its established flows but takes no new ones.
    pub drain: bool,
}

impl Backend {
    /// Whether the backend gets Maglev slots. One that doesn't still serves the flows already
    /// pinned to it in the connection table.
    pub fn takes_new_flows(&self) -> bool {
        !self.drain && self.weight > 0
    }
}

/// How a VIP's packets reach its backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardingMode {
    /// Direct server return on one L2 segment: only the destination MAC is rewritten.
    #[default]
    L2,
    /// IPIP / IP6IP6: an outer IP header to the backend node, for backends across L3. The
    /// backend runs `sluice decap` to take it off.
    Ipip,
}

impl ForwardingMode {
    pub const fn name(self) -> &'static str {
        match self {
            Self::L2 => "l2",
            Self::Ipip => "ipip",
        }
    }
}

impl fmt::Display for ForwardingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ForwardingMode {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "l2" => Ok(Self::L2),
            "ipip" => Ok(Self::Ipip),
            _ => Err(ParseError::new("forwarding mode", s, "l2 or ipip")),
        }
    }
}

/// How a node keeps a connection on its backend when a VIP's table changes (`flow_state`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowState {
    /// Every new flow is recorded in the connection table (the default; works in front of any
    /// server and with any CNI).
    #[default]
    Table,
    /// No flow is recorded: the node the current table picks keeps a packet its own conntrack
    /// knows and hands an unknown non-SYN on to the previous table's pick (docs/design.md,
    /// "Second chance"). Needs netfilter conntrack on every node (kube-proxy's rules).
    SecondChance,
    /// Second chance where this node's conntrack tracks its connections (asked of the kernel
    /// at attach and at every refresh: `dataplane::conntrack_tracks`), table elsewhere.
    Auto,
}

impl FlowState {
    pub const fn name(self) -> &'static str {
        match self {
            Self::Table => "table",
            Self::SecondChance => "second-chance",
            Self::Auto => "auto",
        }
    }

    /// The mode a node runs, given whether its conntrack tracks its connections (`None`: not
    /// asked, or the question failed) and whether a VIP of its encapsulates (IPIP/IP6IP6,
    /// whose receivers unwrap and pass without the second-chance check): `auto` is second
    /// chance only on a known yes and no encapsulating VIP.
    pub const fn effective(self, conntrack_tracks: Option<bool>, encapsulates: bool) -> Self {
        match (self, conntrack_tracks) {
            (Self::Auto, Some(true)) if !encapsulates => Self::SecondChance,
            (Self::Auto, _) => Self::Table,
            (other, _) => other,
        }
    }

    /// [`lb_common::Settings::flow_state`] of the [`Self::effective`] mode (`auto` unresolved
    /// is table).
    pub const fn raw(self) -> u32 {
        match self {
            Self::Table | Self::Auto => lb_common::flow_state::TABLE,
            Self::SecondChance => lb_common::flow_state::SECOND_CHANCE,
        }
    }
}

impl fmt::Display for FlowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FlowState {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "table" => Ok(Self::Table),
            "second-chance" => Ok(Self::SecondChance),
            "auto" => Ok(Self::Auto),
            _ => Err(ParseError::new(
                "flow state",
                s,
                "table, second-chance or auto",
            )),
        }
    }
}

/// A VIP and the backends that serve it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Vip {
    pub key: VipAddr,
    /// Sorted by address, one entry per address. May be empty: the VIP's traffic is then
    /// dropped and counted rather than passed to the host. Shared with the VIPs that have the
    /// same list.
    pub backends: Backends,
    pub mode: ForwardingMode,
    /// Session affinity by client address: every connection of a client lands on one backend.
    pub client_affinity: bool,
    /// Client prefixes admitted; empty admits everyone. Sorted, unique. A client is matched
    /// against the prefixes of its own family only: a VIP whose prefixes are all of the other
    /// family admits nobody.
    pub source_ranges: Vec<IpNet>,
    /// Active health check of the backends (`health`): one that fails drains.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

impl Vip {
    /// A VIP with the defaults every source starts from: L2, no affinity, open to all.
    pub fn new(key: VipAddr, backends: impl Into<Backends>) -> Self {
        Self {
            key,
            backends: backends.into(),
            mode: ForwardingMode::L2,
            client_affinity: false,
            source_ranges: Vec::new(),
            health_check: None,
        }
    }

    /// What its Maglev table is built from, as the model says it: VIPs with equal keys share
    /// one table in the maps.
    pub fn table_key(&self) -> TableKey {
        table_key(self.mode, &self.backends)
    }
}

/// A VIP's table inputs as the model gives them: its mode and (address, weight, takes new
/// flows) per backend, in the backends' order (by address).
pub type TableKey = (ForwardingMode, Vec<(IpAddr, u32, bool)>);

pub fn table_key(mode: ForwardingMode, backends: &[Backend]) -> TableKey {
    (
        mode,
        backends
            .iter()
            .map(|b| (b.addr, b.weight, b.takes_new_flows()))
            .collect(),
    )
}

/// Settings of the whole load balancer (table sizes: changing one rebuilds every table).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Settings {
    /// Slots of every VIP's Maglev table (prime); `None`: each VIP's from
    /// [`lb_common::MAGLEV_TIERS`] by its number of backends.
    pub maglev_table_size: Option<u32>,
    /// Entries of the connection table.
    pub flow_table_size: u32,
    /// Outer source addresses of IPIP packets: the host part varies per flow (so backends'
    /// NICs spread flows over their queues) and backends' decapsulators admit this prefix.
    /// `None`: the egress interface's own address.
    pub encap_source_v4: Option<Ipv4Net>,
    /// The same for IP6IP6.
    pub encap_source_v6: Option<Ipv6Net>,
    /// The flood guard: connection-table inserts per second and CPU; above it new flows ride
    /// on Maglev's pick alone (`flows_not_recorded`). 0: no limit.
    pub max_new_flows_per_cpu: u32,
    /// How flows keep their backends through table changes.
    pub flow_state: FlowState,
}

impl Settings {
    /// Entries of the connection table this node creates (IPv4; IPv6's from it):
    /// `flow_table_size`, but in second-chance mode, which records no flow, the smallest table
    /// sluice creates (kept so that a node switched to table mode before its next restart still
    /// has one; that restart resizes it). `auto` may run either: the full table.
    pub fn connection_table_size(&self) -> u32 {
        match self.flow_state {
            FlowState::SecondChance => lb_common::MIN_FLOW_TABLE_SIZE,
            FlowState::Table | FlowState::Auto => self.flow_table_size,
        }
    }

    /// The Maglev table size of a VIP with `backends` backends.
    pub fn maglev_table_size_for(&self, backends: usize) -> u32 {
        self.maglev_table_size
            .unwrap_or_else(|| lb_common::maglev_tier(backends))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            maglev_table_size: None,
            flow_table_size: DEFAULT_FLOW_TABLE_SIZE,
            encap_source_v4: None,
            encap_source_v6: None,
            max_new_flows_per_cpu: lb_common::DEFAULT_MAX_NEW_FLOWS_PER_CPU,
            flow_state: FlowState::Table,
        }
    }
}

/// Everything the load balancer should be doing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Desired {
    pub settings: Settings,
    /// Sorted by key, one entry per key.
    pub vips: Vec<Vip>,
    /// The nodes that run sluice too (every node balances and serves): a VIP frame from one of
    /// them was balanced there already and goes to this node's stack, and what they
    /// encapsulate to this node is unwrapped inline. This node's own address may be among them.
    pub peers: BTreeSet<IpAddr>,
}

impl Desired {
    pub fn vip(&self, key: &VipAddr) -> Option<&Vip> {
        self.vips
            .binary_search_by(|vip| vip.key.cmp(key))
            .ok()
            .map(|i| &self.vips[i])
    }

    /// Points every backend list equal to one of `old`'s at `old`'s: lists that did not
    /// change stay the same allocation from model to model, so comparing two models, listing
    /// their changes and planning cost one pointer compare per unchanged VIP.
    pub fn share_backends_with(&mut self, old: &Desired) {
        let mut known = backends::Interner::default();
        for vip in &old.vips {
            known.learn(&vip.backends);
        }
        for vip in &mut self.vips {
            vip.backends = known.intern(&vip.backends);
        }
    }

    /// Whether a VIP is forwarded encapsulated (IPIP/IP6IP6): `auto` keeps the table then.
    pub fn encapsulates(&self) -> bool {
        self.vips.iter().any(|v| v.mode != ForwardingMode::L2)
    }

    /// Each distinct backend list once (by allocation), with the modes its VIPs reach it by.
    pub fn distinct_backend_lists(&self) -> impl Iterator<Item = (&Backends, ForwardingMode)> {
        let mut seen = std::collections::HashSet::new();
        self.vips
            .iter()
            .filter(move |vip| seen.insert((vip.backends.id(), vip.mode)))
            .map(|vip| (&vip.backends, vip.mode))
    }
}

/// The key of a VIP as the program sees it.
pub fn vip_key(vip: &VipAddr) -> lb_common::VipKey {
    let (addr, family) = lb_common::raw_addr(vip.addr);
    lb_common::VipKey {
        addr,
        port: vip.port.to_be(),
        proto: vip.protocol.number(),
        family,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn protocol_parses_any_case_and_displays_lowercase() {
        assert_eq!("TCP".parse(), Ok(Protocol::Tcp));
        assert_eq!("Udp".parse(), Ok(Protocol::Udp));
        assert_eq!(Protocol::Udp.to_string(), "udp");
        assert_eq!(Protocol::Tcp.number(), 6);
        assert_eq!(Protocol::Udp.number(), 17);
        let err = "sctp".parse::<Protocol>().unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"invalid protocol "sctp": expected tcp or udp"#
        );
    }

    #[test]
    fn mac_round_trips_and_accepts_dashes() {
        let mac: MacAddr = "02:00:00:00:01:0A".parse().unwrap();
        assert_eq!(mac, MacAddr([2, 0, 0, 0, 1, 10]));
        assert_eq!(mac.to_string(), "02:00:00:00:01:0a");
        assert_eq!("02-00-00-00-01-0a".parse(), Ok(mac));
    }

    #[test]
    fn mac_rejects_malformed_input() {
        for bad in [
            "",
            "zz:00",
            "02:00:00:00:01",
            "02:00:00:00:01:02:03",
            "2:00:00:00:01:02",
            "002:00:00:00:01:02",
            "02:00:00:00:01:+2",
            "02-00:00:00:01:02",
            "02:00:00:00:01:02:",
        ] {
            let err = bad.parse::<MacAddr>().unwrap_err();
            assert!(
                err.to_string()
                    .contains("expected six hex bytes like 02:00:00:00:00:01")
            );
        }
    }

    #[test]
    fn mac_classes() {
        assert!(MacAddr([2, 0, 0, 0, 0, 1]).is_unicast());
        assert!(MacAddr([1, 0, 0x5e, 0, 0, 1]).is_multicast());
        assert!(MacAddr([0xff; 6]).is_multicast());
        assert!(MacAddr([0; 6]).is_zero());
        assert!(!MacAddr([0; 6]).is_unicast());
    }

    #[test]
    fn vip_addr_round_trips_and_defaults_to_tcp() {
        let vip: VipAddr = "10.0.0.10:80/udp".parse().unwrap();
        let expected = VipAddr {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 10)),
            port: 80,
            protocol: Protocol::Udp,
        };
        assert_eq!(vip, expected);
        assert_eq!(vip.to_string(), "10.0.0.10:80/udp");
        let v6: VipAddr = "[fd00::10]:443/tcp".parse().unwrap();
        assert_eq!(v6.addr, "fd00::10".parse::<IpAddr>().unwrap());
        assert_eq!(v6.to_string(), "[fd00::10]:443/tcp");
        let tcp: VipAddr = "10.0.0.10:80".parse().unwrap();
        assert_eq!(tcp.protocol, Protocol::Tcp);
        for bad in [
            "10.0.0.10",
            "10.0.0.10:0",
            "10.0.0.10:65536",
            "10.0.0.10:80/icmp",
            "x:80",
            ":80/tcp",
            "fd00::10:80",
            "[fd00::10:80",
            "[10.0.0.1]:80",
        ] {
            assert!(bad.parse::<VipAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn vip_addr_orders_by_addr_then_port_then_protocol() {
        let key = |s: &str| s.parse::<VipAddr>().unwrap();
        let mut keys = [
            key("10.0.0.2:53/tcp"),
            key("10.0.0.1:80/udp"),
            key("10.0.0.1:80/tcp"),
            key("10.0.0.1:443"),
        ];
        keys.sort();
        let shown: Vec<String> = keys.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "10.0.0.1:80/tcp",
                "10.0.0.1:80/udp",
                "10.0.0.1:443/tcp",
                "10.0.0.2:53/tcp"
            ]
        );
    }

    #[test]
    fn takes_new_flows_needs_weight_and_no_drain() {
        let backend = Backend {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 1)),
            mac: None,
            weight: 1,
            drain: false,
        };
        assert!(backend.takes_new_flows());
        assert!(
            !Backend {
                weight: 0,
                ..backend.clone()
            }
            .takes_new_flows()
        );
        assert!(
            !Backend {
                drain: true,
                ..backend
            }
            .takes_new_flows()
        );
    }

    #[test]
    fn serializes_to_readable_json() {
        let desired = Desired {
            settings: Settings::default(),
            vips: vec![Vip::new(
                "10.0.0.10:80/tcp".parse().unwrap(),
                vec![Backend {
                    addr: IpAddr::V4(Ipv4Addr::new(10, 0, 1, 2)),
                    mac: Some(MacAddr([2, 0, 0, 0, 1, 2])),
                    weight: 3,
                    drain: false,
                }],
            )],
            peers: BTreeSet::new(),
        };
        let json = serde_json::to_value(&desired).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "settings": {"maglev_table_size": null, "flow_table_size": 1048576,
                             "encap_source_v4": null, "encap_source_v6": null,
                             "max_new_flows_per_cpu": 125000, "flow_state": "table"},
                "vips": [{
                    "key": {"addr": "10.0.0.10", "port": 80, "protocol": "tcp"},
                    "backends": [
                        {"addr": "10.0.1.2", "mac": "02:00:00:00:01:02",
                         "weight": 3, "drain": false},
                    ],
                    "mode": "l2", "client_affinity": false, "source_ranges": [],
                }],
                "peers": [],
            })
        );
    }

    #[test]
    fn desired_finds_vips_by_key() {
        let vip = |s: &str| Vip::new(s.parse().unwrap(), Vec::new());
        let desired = Desired {
            settings: Settings::default(),
            vips: vec![vip("10.0.0.1:80"), vip("10.0.0.2:80")],
            peers: BTreeSet::new(),
        };
        assert!(desired.vip(&"10.0.0.2:80/tcp".parse().unwrap()).is_some());
        assert!(desired.vip(&"10.0.0.2:80/udp".parse().unwrap()).is_none());
    }
}
