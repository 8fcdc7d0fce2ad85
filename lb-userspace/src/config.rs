//! The static configuration file: YAML in, a validated [`Desired`] out.
//!
//! ```yaml
//! maglev_table_size: 65537        # optional; a prime from 7 to 1000003; default 65537
//! flow_table_size: 1048576        # optional; 1024 to 67108864 entries; default 1048576
//! encap_source_v4: 10.99.0.0/24   # optional; outer sources of IPIP packets (host part varies
//! encap_source_v6: fd99::/120     #   per flow); default: the egress interface's address
//! peers: [10.200.1.2, 10.200.1.3] # optional; the nodes that run sluice too (every node
//!                                 #   balances and serves): their VIP frames were balanced already
//! vips:                           # required; `vips: []` serves nothing
//!   - address: 10.200.0.10        # IPv4 or IPv6
//!     port: 80
//!     protocol: tcp               # tcp | udp; default tcp
//!     mode: l2                    # l2 (MAC rewrite) | ipip (IPIP/IP6IP6 to backends over L3)
//!     session_affinity: none      # none | client_ip (all of a client's connections, one backend)
//!     source_ranges: []           # optional client prefixes (the VIP's family); empty admits all
//!     backends:                   # required; `backends: []` drops (and counts) the traffic
//!       - address: 10.200.1.2
//!         mac: 02:00:00:00:01:02  # optional; else resolved from the kernel's neighbour table
//!         weight: 1               # optional; 0 to 10000; default 1. 0 = no new flows
//!         drain: false            # optional; true keeps established flows, takes no new ones
//! ```
//!
//! Addresses are unicast IPv4 or IPv6; a VIP is unique by address, port and protocol, a backend
//! by address within its VIP. In `l2` mode backends share the VIP's family; in `ipip` mode an
//! IPv4 VIP may have IPv6 backend nodes and the other way round. An empty value (`mac:`, `mac: ~`) is the same as leaving the key out.
//!
//! The whole file is checked before anything is returned, and an error names the place to fix:
//! `lab.yaml:12: vips[0].backends[2].mac: invalid MAC address "zz:00": expected six hex bytes
//! like 02:00:00:00:00:01; or leave out mac to resolve it from the kernel's neighbour table`.
//!
//! Values are read as text and parsed here, never by YAML's implicit typing, so
//! `02:00:00:00:01:02` is a MAC rather than a base-60 number and `drain: no` is an error rather
//! than a surprise.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::path::Path;

use lb_common::{
    DEFAULT_FLOW_TABLE_SIZE, DEFAULT_MAGLEV_SIZE, MAX_BACKENDS, MAX_MAGLEV_SIZE, MAX_VIPS,
};
use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, LoaderOptions, Node, Span};

use crate::maglev::is_prime;
use crate::model::{
    Backend, Desired, ForwardingMode, IpNet, MAX_WEIGHT, MacAddr, Protocol, Settings, Vip, VipAddr,
};

/// Smallest Maglev table: the prime the paper's examples start from. Real ones are far larger.
const MIN_MAGLEV_SIZE: u32 = 7;
const FLOW_TABLE_SIZES: RangeInclusive<u32> = 1024..=64 << 20;
const DEFAULT_WEIGHT: u32 = 1;

const TOP_KEYS: &[&str] = &[
    "maglev_table_size",
    "flow_table_size",
    "encap_source_v4",
    "encap_source_v6",
    "peers",
    "vips",
];
const VIP_KEYS: &[&str] = &[
    "address",
    "port",
    "protocol",
    "mode",
    "session_affinity",
    "source_ranges",
    "backends",
];
/// Most client prefixes of one VIP (the trie holds all VIPs' prefixes).
const MAX_SOURCE_RANGES_PER_VIP: usize = 1024;
const BACKEND_KEYS: &[&str] = &["address", "mac", "weight", "drain"];

const SYNTAX_HINT: &str = "check the indentation (spaces only, each child indented under its \
     key) and the `key: value` and `- item` forms";
const PORT_HINT: &str = "use a port from 1 to 65535";
const WEIGHT_HINT: &str =
    "a weight is a share relative to the other backends; 0 takes no new flows";
const FLOW_TABLE_HINT: &str = "size it to about the number of concurrent flows";
const MAC_HINT: &str = "or leave out mac to resolve it from the kernel's neighbour table";
const UNICAST_MAC_HINT: &str =
    "use the backend's own MAC, or leave out mac to resolve it from the kernel's neighbour table";

/// A config that cannot be used, and where it goes wrong. Displays as one line:
/// `{origin}:{line}: {field}: {problem}; {what to do}`. An unreadable file has no line and a
/// YAML syntax error no field; those parts are then left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    origin: String,
    line: Option<usize>,
    field: String,
    problem: String,
    hint: String,
}

impl ConfigError {
    /// The file, or whatever name [`parse`] was given.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// 1-based line of the offending field.
    pub fn line(&self) -> Option<usize> {
        self.line
    }

    /// Path of the offending field, like `vips[0].backends[2].mac`; empty for the whole file.
    pub fn field(&self) -> &str {
        &self.field
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        f.write_str(": ")?;
        if !self.field.is_empty() {
            one_line(f, &self.field)?;
            f.write_str(": ")?;
        }
        one_line(f, &self.problem)?;
        f.write_str("; ")?;
        one_line(f, &self.hint)
    }
}

/// Writes `text` with control characters escaped: a key or value quoted from the file (a
/// flow-mapping key may span lines) must not break the message's one line.
fn one_line(f: &mut fmt::Formatter<'_>, text: &str) -> fmt::Result {
    for c in text.chars() {
        if c.is_control() {
            write!(f, "{}", c.escape_default())?;
        } else {
            fmt::Write::write_char(f, c)?;
        }
    }
    Ok(())
}

impl std::error::Error for ConfigError {}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Desired, ConfigError> {
    let origin = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &origin),
        Err(error) => Err(ConfigError {
            origin,
            line: None,
            field: String::new(),
            problem: format!("cannot read the config: {error}"),
            hint: "check the path and its permissions".to_owned(),
        }),
    }
}

/// Validates config `text`; `origin` (the file name) prefixes every error.
pub fn parse(text: &str, origin: &str) -> Result<Desired, ConfigError> {
    let checker = Checker { origin };
    checker.single_document(text)?;
    let options = LoaderOptions::default()
        .error_on_duplicate_keys(true)
        .prevent_coercion(true);
    let root = marked_yaml::parse_yaml_with_options(0, text, options)
        .map_err(|error| checker.load_error(text, error))?;
    checker.desired(&root)
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

fn span_line(span: &Span) -> Option<usize> {
    span.start().map(|marker| marker.line())
}

fn key_line(key: &MarkedScalarNode) -> Option<usize> {
    span_line(key.span())
}

/// The line to blame for a node. A block mapping's own span starts after its first key, and
/// on the next line for `-` alone on its line: its first key is where a reader looks.
fn node_line(node: &Node) -> Option<usize> {
    match node {
        Node::Mapping(mapping) => mapping
            .iter()
            .next()
            .and_then(|(key, _)| key_line(key))
            .or_else(|| span_line(mapping.span())),
        _ => span_line(node.span()),
    }
}

fn child_path(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

fn line_note(line: Option<usize>) -> String {
    line.map(|line| format!(" (line {line})"))
        .unwrap_or_default()
}

/// YAML's null: an empty value, `~` or `null`, unquoted.
fn is_null(node: &Node) -> bool {
    node.as_scalar().is_some_and(|scalar| {
        scalar.may_coerce() && matches!(scalar.as_str(), "" | "~" | "null" | "Null" | "NULL")
    })
}

fn kind(node: &Node) -> &'static str {
    match node {
        Node::Scalar(_) => "a single value",
        Node::Mapping(_) => "a mapping",
        Node::Sequence(_) => "a list",
    }
}

/// Why `addr` cannot be a VIP or a backend, if it cannot.
fn not_unicast(addr: IpAddr) -> Option<&'static str> {
    let addr = match addr {
        IpAddr::V4(addr) => addr,
        IpAddr::V6(addr) => {
            return if addr.is_unspecified() {
                Some("is the unspecified address ::")
            } else if addr.is_loopback() {
                Some("is the loopback address, which never crosses the wire")
            } else if addr.is_multicast() {
                Some("is a multicast address")
            } else if addr.to_ipv4_mapped().is_some() {
                Some("is an IPv4-mapped address; write the IPv4 address itself")
            } else {
                None
            };
        }
    };
    if addr.octets()[0] == 0 {
        // 0.0.0.0/8 only ever means "this host" as a source (RFC 1122).
        Some("is in 0.0.0.0/8, which is never a destination")
    } else if addr.is_loopback() {
        // Martian on the wire: the XDP program never sees it and a backend there is this host.
        Some("is a loopback address, which never crosses the wire")
    } else if addr.is_multicast() {
        Some("is a multicast address")
    } else if addr.is_broadcast() {
        Some("is the broadcast address")
    } else {
        None
    }
}

/// A node with its field path and the line to blame for it: the key's line for a mapping value
/// (the value of `port:` may sit on the next line, or be empty), the item's for a list item.
struct Field<'n> {
    node: &'n Node,
    path: String,
    line: Option<usize>,
}

/// A mapping whose keys have been checked against its schema.
struct Fields<'n> {
    mapping: &'n MarkedMappingNode,
    path: String,
    line: Option<usize>,
}

impl<'n> Fields<'n> {
    fn entry(&self, key: &str) -> Option<Field<'n>> {
        self.mapping
            .iter()
            .find(|(name, _)| name.as_str() == key)
            .map(|(name, node)| Field {
                node,
                path: child_path(&self.path, key),
                line: key_line(name),
            })
    }

    /// An optional field; an empty value counts as absent.
    fn get(&self, key: &str) -> Option<Field<'n>> {
        self.entry(key).filter(|field| !is_null(field.node))
    }
}

struct Checker<'a> {
    origin: &'a str,
}

impl Checker<'_> {
    fn error(
        &self,
        line: Option<usize>,
        field: &str,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            origin: self.origin.to_owned(),
            line,
            field: field.to_owned(),
            problem: problem.into(),
            hint: hint.into(),
        }
    }

    fn error_at(
        &self,
        field: &Field<'_>,
        problem: impl Into<String>,
        hint: impl Into<String>,
    ) -> ConfigError {
        self.error(field.line, &field.path, problem, hint)
    }

    /// The YAML loader reads the first document of a stream and ignores the rest: a stray `---`
    /// would silently drop the tail of the config. Document markers only count at column 0, so
    /// a line scan finds them exactly.
    fn single_document(&self, text: &str) -> Result<()> {
        let is_marker = |line: &str, marker: &str| {
            line.strip_prefix(marker)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        };
        let mut content_seen = false;
        // Line of the `...` that closed the document.
        let mut ended_on = None;
        for (number, line) in (1..).zip(text.lines()) {
            let (starts_document, rest) = if is_marker(line, "---") {
                (true, line[3..].trim_start())
            } else if is_marker(line, "...") {
                if content_seen {
                    ended_on.get_or_insert(number);
                }
                continue;
            } else if line.starts_with('%') && !content_seen {
                continue; // A directive, like `%YAML 1.2`.
            } else {
                (false, line.trim_start())
            };
            let has_content = !rest.is_empty() && !rest.starts_with('#');
            let problem = if starts_document && (content_seen || ended_on.is_some()) {
                "a second YAML document starts here".to_owned()
            } else if let Some(end) = ended_on.filter(|_| has_content) {
                format!("content after the end of the document (`...` on line {end})")
            } else {
                content_seen |= has_content;
                continue;
            };
            return Err(self.error(
                Some(number),
                "",
                problem,
                "keep the whole config in one YAML document: remove the `---` or `...` separator",
            ));
        }
        Ok(())
    }

    fn load_error(&self, text: &str, error: LoadError) -> ConfigError {
        let syntax = |at: marked_yaml::Marker, problem: &str, hint: &str| {
            self.error(
                Some(at.line()),
                "",
                format!("{problem} (column {})", at.column()),
                hint,
            )
        };
        match error {
            LoadError::ScanError(at, scan) => syntax(
                at,
                &format!("YAML syntax error: {}", scan.info()),
                SYNTAX_HINT,
            ),
            LoadError::TopLevelMustBeMapping(at) | LoadError::TopLevelMustBeSequence(at) => syntax(
                at,
                "the config must be a mapping of settings and `vips`",
                "start with a `vips:` line, as in the documented example",
            ),
            LoadError::UnexpectedAnchor(at) => syntax(
                at,
                "YAML anchors and aliases (&name, *name) are not supported",
                "write the values out in full",
            ),
            LoadError::UnexpectedTag(at) => syntax(
                at,
                "YAML tags (!name, !!type) are not supported",
                "remove the tag; values are read as text and checked per field",
            ),
            LoadError::MappingKeyMustBeScalar(at) => syntax(
                at,
                "a key must be a plain name",
                "use one of the documented keys",
            ),
            LoadError::DuplicateKey(keys) => {
                let key = keys.key.as_str();
                let field =
                    duplicate_key_path(text, &keys.prev_key).unwrap_or_else(|| key.to_owned());
                self.error(
                    key_line(&keys.key),
                    &field,
                    format!(
                        "`{key}` appears twice in one mapping{}",
                        line_note(key_line(&keys.prev_key))
                    ),
                    "keep one of them",
                )
            }
        }
    }

    fn desired(&self, root: &Node) -> Result<Desired> {
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
                Some(field) => self.maglev_table_size(&field)?,
                None => DEFAULT_MAGLEV_SIZE,
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
        let mut total_backends = 0;
        for item in &items {
            if vips.len() == MAX_VIPS as usize {
                return Err(self.error_at(
                    item,
                    format!("more than {MAX_VIPS} VIPs"),
                    "that is all one load balancer serves; spread the VIPs over several",
                ));
            }
            let vip = self.vip(item, &settings, &mut total_backends)?;
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

    fn vip(&self, item: &Field<'_>, settings: &Settings, total_backends: &mut u32) -> Result<Vip> {
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
            *total_backends += 1;
            if *total_backends > MAX_BACKENDS {
                return Err(self.error_at(
                    item,
                    format!("more than {MAX_BACKENDS} backends over all VIPs"),
                    "that is the size of the backend table; spread the VIPs over several \
                     load balancers",
                ));
            }
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
                if taking_new_flows > settings.maglev_table_size {
                    return Err(self.error_at(
                        item,
                        format!(
                            "{taking_new_flows} backends take new flows but maglev_table_size \
                             is only {}",
                            settings.maglev_table_size
                        ),
                        "raise maglev_table_size to a prime over 100 times the number of backends",
                    ));
                }
            }
            backends.push(backend);
        }
        backends.sort_unstable_by_key(|backend| backend.addr);
        Ok(Vip {
            key,
            backends,
            mode,
            client_affinity,
            source_ranges,
        })
    }

    fn backend(&self, item: &Field<'_>) -> Result<Backend> {
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

    /// Records `key` as seen at `item`, or names the earlier item it duplicates.
    fn unique<K: Eq + Hash + fmt::Display>(
        &self,
        seen: &mut HashMap<K, (String, Option<usize>)>,
        key: K,
        item: &Field<'_>,
        hint: &str,
    ) -> Result<()> {
        match seen.entry(key) {
            Entry::Vacant(entry) => {
                entry.insert((item.path.clone(), item.line));
                Ok(())
            }
            Entry::Occupied(entry) => {
                let (first_path, first_line) = entry.get();
                Err(self.error_at(
                    item,
                    format!(
                        "duplicates {first_path}{}, both {}",
                        line_note(*first_line),
                        entry.key()
                    ),
                    hint,
                ))
            }
        }
    }

    /// `field` as a mapping with only the keys in `keys`.
    fn fields<'n>(&self, field: &Field<'n>, keys: &[&str]) -> Result<Fields<'n>> {
        let Some(mapping) = field.node.as_mapping() else {
            return Err(self.error_at(
                field,
                format!("expected a mapping, found {}", kind(field.node)),
                format!("write `key: value` lines with the keys {}", keys.join(", ")),
            ));
        };
        if let Some(unknown) = mapping.keys().find(|key| !keys.contains(&key.as_str())) {
            return Err(self.error(
                key_line(unknown),
                &child_path(&field.path, unknown.as_str()),
                "unknown key",
                format!("valid keys here are {}", keys.join(", ")),
            ));
        }
        Ok(Fields {
            mapping,
            path: field.path.clone(),
            line: field.line,
        })
    }

    /// A field that must be present; its value may still be empty (checked by the caller).
    fn require<'n>(&self, fields: &Fields<'n>, key: &str, hint: &str) -> Result<Field<'n>> {
        fields
            .entry(key)
            .ok_or_else(|| self.error(fields.line, &child_path(&fields.path, key), "missing", hint))
    }

    /// The items of a list; an empty value is an empty list.
    fn list<'n>(&self, field: &Field<'n>, hint: &str) -> Result<Vec<Field<'n>>> {
        if is_null(field.node) {
            return Ok(Vec::new());
        }
        let Some(items) = field.node.as_sequence() else {
            return Err(self.error_at(
                field,
                format!("expected a list, found {}", kind(field.node)),
                hint,
            ));
        };
        Ok(items
            .iter()
            .enumerate()
            .map(|(index, node)| Field {
                node,
                path: format!("{}[{index}]", field.path),
                line: node_line(node),
            })
            .collect())
    }

    fn text<'n>(&self, field: &Field<'n>, expected: &str, hint: &str) -> Result<&'n str> {
        match field.node.as_scalar() {
            Some(_) if is_null(field.node) => {
                Err(self.error_at(field, format!("has no value, expected {expected}"), hint))
            }
            Some(scalar) => Ok(scalar.as_str()),
            None => Err(self.error_at(
                field,
                format!("expected {expected}, found {}", kind(field.node)),
                hint,
            )),
        }
    }

    /// A decimal number in `range`.
    fn number(&self, field: &Field<'_>, range: RangeInclusive<u32>, hint: &str) -> Result<u32> {
        let text = self.text(field, "a number", hint)?;
        if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(self.error_at(
                field,
                format!("expected a whole number, found {text:?}"),
                hint,
            ));
        }
        // All digits: a parse failure can only be an overflow, which is out of range too.
        match text.parse::<u32>() {
            Ok(value) if range.contains(&value) => Ok(value),
            _ => Err(self.error_at(
                field,
                format!("{text} is out of range {}..={}", range.start(), range.end()),
                hint,
            )),
        }
    }

    fn boolean(&self, field: &Field<'_>, hint: &str) -> Result<bool> {
        match self.text(field, "true or false", hint)? {
            "true" | "True" | "TRUE" => Ok(true),
            "false" | "False" | "FALSE" => Ok(false),
            text => Err(self.error_at(
                field,
                format!("expected true or false, found {text:?}"),
                hint,
            )),
        }
    }

    fn protocol(&self, field: &Field<'_>) -> Result<Protocol> {
        const HINT: &str = "use tcp or udp (the default is tcp)";
        let text = self.text(field, "tcp or udp", HINT)?;
        text.parse()
            .map_err(|_| self.error_at(field, format!("unknown protocol {text:?}"), HINT))
    }

    fn unicast_addr(&self, field: &Field<'_>) -> Result<IpAddr> {
        const HINT: &str = "write a unicast IPv4 or IPv6 address like 10.200.0.10 or fd00::10";
        let text = self.text(field, "an IP address", HINT)?;
        let addr: IpAddr = text
            .parse()
            .map_err(|_| self.error_at(field, format!("invalid IP address {text:?}"), HINT))?;
        match not_unicast(addr) {
            Some(reason) => Err(self.error_at(field, format!("{addr} {reason}"), HINT)),
            None => Ok(addr),
        }
    }

    /// An address prefix like 10.0.0.0/8, of `family` (4 or 6) when given, host bits zero.
    fn prefix(&self, field: &Field<'_>, family: Option<u8>) -> Result<IpNet> {
        let hint = match family {
            Some(4) => "write an IPv4 prefix like 192.0.2.0/24",
            Some(_) => "write an IPv6 prefix like 2001:db8::/64",
            None => "write a prefix like 192.0.2.0/24 or 2001:db8::/64",
        };
        let text = self.text(field, "an address prefix", hint)?;
        let net: IpNet = text
            .parse()
            .map_err(|_| self.error_at(field, format!("invalid prefix {text:?}"), hint))?;
        let net_family = if net.addr().is_ipv4() { 4 } else { 6 };
        if family.is_some_and(|f| f != net_family) {
            return Err(self.error_at(
                field,
                format!("{net} is an IPv{net_family} prefix"),
                format!("{hint} (the VIP's family)"),
            ));
        }
        if net.trunc() != net {
            return Err(self.error_at(
                field,
                format!("{net} has host bits set"),
                format!("write {}", net.trunc()),
            ));
        }
        Ok(net)
    }

    fn mac(&self, field: &Field<'_>) -> Result<MacAddr> {
        let text = self.text(field, "a MAC address", MAC_HINT)?;
        let mac: MacAddr = text
            .parse()
            .map_err(|error| self.error_at(field, format!("{error}"), MAC_HINT))?;
        if mac.is_multicast() {
            return Err(self.error_at(
                field,
                format!("{mac} is a multicast address"),
                UNICAST_MAC_HINT,
            ));
        }
        if mac.is_zero() {
            return Err(self.error_at(
                field,
                "00:00:00:00:00:00 is not a station's address",
                UNICAST_MAC_HINT,
            ));
        }
        Ok(mac)
    }

    fn maglev_table_size(&self, field: &Field<'_>) -> Result<u32> {
        let size = self.number(
            field,
            MIN_MAGLEV_SIZE..=MAX_MAGLEV_SIZE,
            &format!("use a prime such as {DEFAULT_MAGLEV_SIZE}"),
        )?;
        if is_prime(size) {
            return Ok(size);
        }
        // MAX_MAGLEV_SIZE is prime, so there is always one to suggest.
        let next = (size..=MAX_MAGLEV_SIZE)
            .find(|&n| is_prime(n))
            .unwrap_or(DEFAULT_MAGLEV_SIZE);
        Err(self.error_at(
            field,
            format!("{size} is not prime"),
            format!(
                "use a prime such as {next} (Maglev needs one so that every backend can reach \
                 every slot)"
            ),
        ))
    }
}

/// Checks table sizes given outside a config file (the agent's flags), with the file's limits.
pub fn validate_settings(settings: &Settings) -> std::result::Result<(), String> {
    let size = settings.maglev_table_size;
    if !(MIN_MAGLEV_SIZE..=MAX_MAGLEV_SIZE).contains(&size) || !is_prime(size) {
        return Err(format!(
            "maglev table size {size}: expected a prime from {MIN_MAGLEV_SIZE} to {MAX_MAGLEV_SIZE}, such as {DEFAULT_MAGLEV_SIZE}"
        ));
    }
    if !FLOW_TABLE_SIZES.contains(&settings.flow_table_size) {
        return Err(format!(
            "flow table size {}: expected {} to {} entries",
            settings.flow_table_size,
            FLOW_TABLE_SIZES.start(),
            FLOW_TABLE_SIZES.end()
        ));
    }
    Ok(())
}

/// Full path of the key that `first` (a key's first occurrence) names, found by loading the
/// text again with duplicate keys allowed; the loader's error only knows the key's name.
fn duplicate_key_path(text: &str, first: &MarkedScalarNode) -> Option<String> {
    let target = first
        .span()
        .start()
        .map(|marker| (marker.line(), marker.column()))?;
    let root = marked_yaml::parse_yaml_with_options(0, text, LoaderOptions::default()).ok()?;
    find_key(&root, target, "")
}

fn find_key(node: &Node, target: (usize, usize), path: &str) -> Option<String> {
    match node {
        Node::Scalar(_) => None,
        Node::Mapping(mapping) => mapping.iter().find_map(|(key, value)| {
            let key_path = child_path(path, key.as_str());
            let at = key
                .span()
                .start()
                .map(|marker| (marker.line(), marker.column()));
            if at == Some(target) {
                Some(key_path)
            } else {
                find_key(value, target, &key_path)
            }
        }),
        Node::Sequence(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| find_key(item, target, &format!("{path}[{index}]"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A config from its lines, so that a test's line numbers are its indices + 1.
    fn yaml(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    fn error(lines: &[&str]) -> ConfigError {
        match parse(&yaml(lines), "lab.yaml") {
            Ok(desired) => panic!("expected an error, parsed {desired:?}"),
            Err(error) => error,
        }
    }

    /// Asserts where an error points and that its one-line message names the file, line,
    /// field and `needle`.
    fn assert_error(lines: &[&str], line: usize, field: &str, needle: &str) {
        let error = error(lines);
        let message = error.to_string();
        println!("{message}");
        assert_eq!(
            (error.line(), error.field()),
            (Some(line), field),
            "{message}"
        );
        let prefix = if field.is_empty() {
            format!("lab.yaml:{line}: ")
        } else {
            format!("lab.yaml:{line}: {field}: ")
        };
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.contains(needle), "{message:?} lacks {needle:?}");
        assert!(!message.contains('\n'), "{message}");
    }

    #[test]
    fn a_key_spanning_lines_stays_on_the_message_line() {
        // Found by tests/tests/config_fuzz.rs: a flow-mapping key may hold a line break.
        let message = parse("{\nbad\n\nkey: 1}\n", "lab.yaml")
            .expect_err("unknown key")
            .to_string();
        assert!(
            message.starts_with("lab.yaml:2: bad\\nkey: unknown key"),
            "{message}"
        );
        assert!(!message.contains('\n'), "{message}");
    }

    /// One VIP with one backend, and `extra` lines spliced in after line `at` (1-based).
    fn with(at: usize, extra: &[&'static str]) -> Vec<&'static str> {
        let mut lines = vec![
            "vips:",                       // 1
            "  - address: 10.200.0.10",    // 2
            "    port: 80",                // 3
            "    backends:",               // 4
            "      - address: 10.200.1.2", // 5
        ];
        lines.splice(at..at, extra.iter().copied());
        lines
    }

    fn backend(addr: [u8; 4], mac: Option<[u8; 6]>, weight: u32, drain: bool) -> Backend {
        Backend {
            addr: addr.into(),
            mac: mac.map(MacAddr),
            weight,
            drain,
        }
    }

    #[test]
    fn full_config() {
        let text = yaml(&[
            "# lab",
            "maglev_table_size: 251",
            "flow_table_size: 4096",
            "vips:",
            "  - address: 10.200.0.10",
            "    port: 80",
            "    protocol: tcp",
            "    backends:",
            "      - address: 10.200.1.3",
            "        weight: 3",
            "      - address: 10.200.1.2",
            "        mac: 02:00:00:00:01:02",
            "        drain: true",
            "      - address: 10.200.1.4",
            "        mac: \"02-00-00-00-01-04\"",
            "        weight: 0",
            "  - address: 10.200.0.10",
            "    port: 53",
            "    protocol: UDP",
            "    backends: []",
            "  - {address: 10.200.0.9, port: 443, backends: [{address: 10.200.1.9}]}",
            "  - address: 10.200.0.10",
            "    port: 53",
            "    backends:",
        ]);
        let desired = parse(&text, "lab.yaml").unwrap();
        let key = |s: &str| s.parse::<VipAddr>().unwrap();
        let expected = Desired {
            settings: Settings {
                maglev_table_size: 251,
                flow_table_size: 4096,
                ..Settings::default()
            },
            vips: vec![
                Vip::new(
                    key("10.200.0.9:443/tcp"),
                    vec![backend([10, 200, 1, 9], None, 1, false)],
                ),
                Vip::new(key("10.200.0.10:53/tcp"), vec![]),
                Vip::new(key("10.200.0.10:53/udp"), vec![]),
                Vip::new(
                    key("10.200.0.10:80/tcp"),
                    vec![
                        backend([10, 200, 1, 2], Some([2, 0, 0, 0, 1, 2]), 1, true),
                        backend([10, 200, 1, 3], None, 3, false),
                        backend([10, 200, 1, 4], Some([2, 0, 0, 0, 1, 4]), 0, false),
                    ],
                ),
            ],
            peers: Default::default(),
        };
        assert_eq!(desired, expected);
    }

    #[test]
    fn defaults() {
        let desired = parse(&yaml(&with(5, &[])), "lab.yaml").unwrap();
        assert_eq!(desired.settings, Settings::default());
        assert_eq!(desired.settings.maglev_table_size, DEFAULT_MAGLEV_SIZE);
        assert_eq!(desired.settings.flow_table_size, DEFAULT_FLOW_TABLE_SIZE);
        let vip = &desired.vips[0];
        assert_eq!(vip.key.protocol, Protocol::Tcp);
        assert_eq!(
            vip.backends,
            [backend([10, 200, 1, 2], None, DEFAULT_WEIGHT, false)]
        );
        // Empty values are absent ones.
        let empty = parse(
            &yaml(&with(
                5,
                &["        mac:", "        weight: ~", "        drain: null"],
            )),
            "x",
        )
        .unwrap();
        assert_eq!(empty, desired);
    }

    #[test]
    fn empty_vips_are_allowed_but_not_a_missing_list() {
        assert_eq!(parse("vips: []\n", "lab.yaml").unwrap(), Desired::default());
        assert_eq!(parse("vips:\n", "lab.yaml").unwrap(), Desired::default());
        assert_error(&["# nothing"], 1, "vips", "missing");
        assert_error(&["flow_table_size: 2048"], 1, "vips", "missing");
    }

    #[test]
    fn syntax_error() {
        assert_error(
            &["vips:", "  - address: 10.0.0.1", "   port: 80"],
            3,
            "",
            "YAML syntax error",
        );
        assert_error(&["vips:", "\t- address: 10.0.0.1"], 2, "", "tabs");
        assert_error(&["vips: [", ""], 3, "", "YAML syntax error");
        assert_error(&["- 1"], 1, "", "must be a mapping");
        assert_error(&["vips: &all []", "more: *all"], 1, "", "anchors");
    }

    #[test]
    fn a_second_document_is_an_error() {
        assert_error(
            &["---", "vips: []", "---", "flow_table_size: 1"],
            3,
            "",
            "second YAML document",
        );
        assert_error(&["vips: []", "...", "vips: []"], 3, "", "(`...` on line 2)");
        assert_error(&["vips: []", "--- # again"], 2, "", "second YAML document");
        assert!(parse(&yaml(&["%YAML 1.2", "---", "vips: []", "..."]), "x").is_ok());
    }

    #[test]
    fn unknown_key() {
        assert_error(
            &["vips: []", "maglev_size: 7"],
            2,
            "maglev_size",
            "valid keys here are maglev_table_size, flow_table_size, encap_source_v4, encap_source_v6, peers, vips",
        );
        assert_error(
            &with(3, &["    proto: udp"]),
            4,
            "vips[0].proto",
            "address, port, protocol, mode, session_affinity, source_ranges, backends",
        );
        assert_error(
            &with(5, &["        wieght: 2"]),
            6,
            "vips[0].backends[0].wieght",
            "unknown key",
        );
    }

    #[test]
    fn duplicate_key() {
        assert_error(
            &with(3, &["    port: 81"]),
            4,
            "vips[0].port",
            "appears twice in one mapping (line 3)",
        );
    }

    #[test]
    fn wrong_types() {
        assert_error(
            &["vips: 10.0.0.1"],
            1,
            "vips",
            "expected a list, found a single value",
        );
        assert_error(
            &["vips:", "  - 10.0.0.1"],
            2,
            "vips[0]",
            "expected a mapping, found a single value",
        );
        let mut list_port = with(5, &[]);
        list_port[2] = "    port: [80]";
        assert_error(
            &list_port,
            3,
            "vips[0].port",
            "expected a number, found a list",
        );
        assert_error(
            &with(3, &["    backends: {address: 10.0.0.1}"])[..4],
            4,
            "vips[0].backends",
            "expected a list",
        );
        assert_error(
            &with(5, &["        drain: yes"]),
            6,
            "vips[0].backends[0].drain",
            "expected true or false, found \"yes\"",
        );
        assert_error(
            &with(5, &["        weight: 1.5"]),
            6,
            "vips[0].backends[0].weight",
            "expected a whole number",
        );
    }

    #[test]
    fn missing_required_fields() {
        let no_port = ["vips:", "  - address: 10.200.0.10", "    backends: []"];
        assert_error(&no_port, 2, "vips[0].port", "missing");
        let no_address = ["vips:", "  - port: 80", "    backends: []"];
        assert_error(&no_address, 2, "vips[0].address", "missing");
        let empty_port = [
            "vips:",
            "  - address: 10.200.0.10",
            "    port:",
            "    backends: []",
        ];
        assert_error(&empty_port, 3, "vips[0].port", "has no value");
        assert_error(
            &["vips:", "  - address: 10.200.0.10", "    port: 80"],
            2,
            "vips[0].backends",
            "missing",
        );
        let mut no_backend_address = with(5, &[]);
        no_backend_address[4] = "      - weight: 2";
        assert_error(
            &no_backend_address,
            5,
            "vips[0].backends[0].address",
            "missing",
        );
    }

    #[test]
    fn bad_addresses() {
        let vip_at = |addr: &'static str| {
            let mut lines = with(5, &[]);
            lines[1] = addr;
            lines
        };
        assert_error(
            &vip_at("  - address: 10.200.0.300"),
            2,
            "vips[0].address",
            "invalid IP address \"10.200.0.300\"",
        );
        assert_error(
            &vip_at("  - address: 0.0.0.0"),
            2,
            "vips[0].address",
            "0.0.0.0/8",
        );
        assert_error(
            &vip_at("  - address: 224.0.0.5"),
            2,
            "vips[0].address",
            "multicast",
        );
        assert_error(
            &vip_at("  - address: 255.255.255.255"),
            2,
            "vips[0].address",
            "broadcast",
        );
        assert_error(
            &vip_at("  - address: 127.0.0.1"),
            2,
            "vips[0].address",
            "loopback",
        );
        let mut lines = with(5, &[]);
        lines[4] = "      - address: example.com";
        assert_error(
            &lines,
            5,
            "vips[0].backends[0].address",
            "invalid IP address",
        );
    }

    #[test]
    fn ipv6_modes_affinity_and_source_ranges() {
        let text = yaml(&[
            "encap_source_v4: 10.99.0.0/24",
            "encap_source_v6: fd99::/120",
            "vips:",
            "  - address: fd00::10",
            "    port: 443",
            "    mode: ipip",
            "    session_affinity: client_ip",
            "    source_ranges:",
            "      - 2001:db8::/32",
            "      - fd00::/8",
            "      - 2001:db8::/32",
            "    backends:",
            "      - address: 10.200.1.2",
            "      - address: fd00:1::2",
        ]);
        let desired = parse(&text, "lab.yaml").unwrap();
        assert_eq!(
            desired.settings.encap_source_v4,
            Some("10.99.0.0/24".parse().unwrap())
        );
        assert_eq!(
            desired.settings.encap_source_v6,
            Some("fd99::/120".parse().unwrap())
        );
        let vip = &desired.vips[0];
        assert_eq!(vip.key.to_string(), "[fd00::10]:443/tcp");
        assert_eq!(vip.mode, ForwardingMode::Ipip);
        assert!(vip.client_affinity);
        let ranges: Vec<String> = vip.source_ranges.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            ranges,
            ["2001:db8::/32", "fd00::/8"],
            "sorted, deduplicated"
        );
        assert_eq!(
            vip.backends.len(),
            2,
            "ipip reaches backends of both families"
        );
    }

    #[test]
    fn bad_modes_and_ranges() {
        assert_error(
            &with(3, &["    mode: vxlan"]),
            4,
            "vips[0].mode",
            "unknown mode \"vxlan\"",
        );
        assert_error(
            &with(3, &["    session_affinity: cookie"]),
            4,
            "vips[0].session_affinity",
            "unknown session affinity",
        );
        assert_error(
            &with(3, &["    source_ranges: [10.0.0.1/8]"]),
            4,
            "vips[0].source_ranges[0]",
            "has host bits set; write 10.0.0.0/8",
        );
        assert_error(
            &with(3, &["    source_ranges:", "      - fd00::/8"]),
            5,
            "vips[0].source_ranges[0]",
            "is an IPv6 prefix",
        );
        let mut l2_mixed = with(5, &[]);
        l2_mixed[4] = "      - address: fd00::2";
        assert_error(
            &l2_mixed,
            5,
            "vips[0].backends[0]",
            "not of the VIP's family, which mode l2 needs",
        );
        let mut bad_source = with(0, &["encap_source_v4: fd99::/120"]);
        bad_source.truncate(6);
        assert_error(&bad_source, 1, "encap_source_v4", "is an IPv6 prefix");
        let mut mapped = with(5, &[]);
        mapped[1] = "  - address: ::ffff:10.0.0.1";
        assert_error(&mapped, 2, "vips[0].address", "IPv4-mapped");
    }

    #[test]
    fn bad_ports() {
        let port = |line: &'static str| {
            let mut lines = with(5, &[]);
            lines[2] = line;
            lines
        };
        assert_error(
            &port("    port: 0"),
            3,
            "vips[0].port",
            "0 is out of range 1..=65535; use a port from 1 to 65535",
        );
        assert_error(
            &port("    port: 70000"),
            3,
            "vips[0].port",
            "70000 is out of range",
        );
        assert_error(
            &port("    port: 99999999999999999999"),
            3,
            "vips[0].port",
            "out of range",
        );
        assert_error(
            &port("    port: http"),
            3,
            "vips[0].port",
            "expected a whole number, found \"http\"",
        );
        assert_error(
            &port("    port: -1"),
            3,
            "vips[0].port",
            "expected a whole number",
        );
    }

    #[test]
    fn bad_protocol() {
        assert_error(
            &with(3, &["    protocol: sctp"]),
            4,
            "vips[0].protocol",
            "unknown protocol \"sctp\"; use tcp or udp",
        );
    }

    #[test]
    fn bad_mac() {
        assert_error(
            &with(5, &["        mac: zz:00"]),
            6,
            "vips[0].backends[0].mac",
            "invalid MAC address \"zz:00\": expected six hex bytes like 02:00:00:00:00:01",
        );
        assert_error(
            &with(5, &["        mac: 01:00:5e:00:00:01"]),
            6,
            "vips[0].backends[0].mac",
            "01:00:5e:00:00:01 is a multicast address",
        );
        assert_error(
            &with(5, &["        mac: ff:ff:ff:ff:ff:ff"]),
            6,
            "vips[0].backends[0].mac",
            "multicast",
        );
        assert_error(
            &with(5, &["        mac: 00:00:00:00:00:00"]),
            6,
            "vips[0].backends[0].mac",
            "not a station's address",
        );
    }

    #[test]
    fn weight_range() {
        assert_error(
            &with(5, &["        weight: 10001"]),
            6,
            "vips[0].backends[0].weight",
            "10001 is out of range 0..=10000",
        );
        let max = parse(&yaml(&with(5, &["        weight: 10000"])), "x").unwrap();
        assert_eq!(max.vips[0].backends[0].weight, MAX_WEIGHT);
    }

    #[test]
    fn table_sizes() {
        assert_error(
            &with(0, &["maglev_table_size: 65536"]),
            1,
            "maglev_table_size",
            "65536 is not prime; use a prime such as 65537",
        );
        assert_error(
            &with(0, &["maglev_table_size: 5"]),
            1,
            "maglev_table_size",
            "5 is out of range 7..=1000003",
        );
        assert_error(
            &with(0, &["maglev_table_size: 1000033"]),
            1,
            "maglev_table_size",
            "out of range",
        );
        assert_error(
            &with(0, &["flow_table_size: 1000"]),
            1,
            "flow_table_size",
            "1000 is out of range 1024..=67108864",
        );
        assert_error(
            &with(0, &["flow_table_size: 67108865"]),
            1,
            "flow_table_size",
            "out of range",
        );
        let largest = parse(
            &yaml(&with(
                0,
                &["maglev_table_size: 1000003", "flow_table_size: 67108864"],
            )),
            "x",
        )
        .unwrap();
        assert_eq!(
            largest.settings,
            Settings {
                maglev_table_size: MAX_MAGLEV_SIZE,
                flow_table_size: 64 << 20,
                ..Settings::default()
            }
        );
    }

    #[test]
    fn duplicate_vip() {
        let lines = with(
            5,
            &[
                "  - address: 10.200.0.11", // 6
                "    port: 80",
                "    backends: []",
                "  - address: 10.200.0.10", // 9
                "    port: 80",
                "    protocol: tcp",
                "    backends: []",
            ],
        );
        assert_error(
            &lines,
            9,
            "vips[2]",
            "duplicates vips[0] (line 2), both 10.200.0.10:80/tcp",
        );
        // The same address and port over another protocol is another VIP.
        let mut udp = lines.clone();
        udp[10] = "    protocol: udp";
        assert_eq!(parse(&yaml(&udp), "x").unwrap().vips.len(), 3);
    }

    #[test]
    fn duplicate_backend() {
        let lines = with(
            5,
            &[
                "      - address: 10.200.1.3",
                "      - address: 10.200.1.2",
                "        drain: true",
            ],
        );
        assert_error(
            &lines,
            7,
            "vips[0].backends[2]",
            "duplicates vips[0].backends[0] (line 5), both 10.200.1.2",
        );
        // The same backend behind two VIPs is fine.
        let shared = with(
            5,
            &[
                "  - address: 10.200.0.11",
                "    port: 80",
                "    backends:",
                "      - address: 10.200.1.2",
            ],
        );
        assert_eq!(parse(&yaml(&shared), "x").unwrap().vips.len(), 2);
    }

    #[test]
    fn more_live_backends_than_slots() {
        let mut lines = vec![
            "maglev_table_size: 7",
            "vips:",
            "  - address: 10.200.0.10",
            "    port: 80",
            "    backends:",
        ];
        let addrs: Vec<String> = (1..=8)
            .map(|i| format!("      - address: 10.200.1.{i}"))
            .collect();
        lines.extend(addrs.iter().map(String::as_str));
        assert_error(
            &lines,
            13,
            "vips[0].backends[7]",
            "8 backends take new flows but maglev_table_size is only 7",
        );
        // Backends that take no new flows need no slot.
        lines.push("        weight: 0");
        assert!(parse(&yaml(&lines), "x").is_ok());
    }

    #[test]
    fn limits_on_vips_and_backends() {
        let mut text = String::from("vips:\n");
        for i in 0..=MAX_VIPS {
            text += &format!(
                "  - {{address: 10.{}.{}.1, port: 80, backends: []}}\n",
                i / 256 + 1,
                i % 256
            );
        }
        let error = parse(&text, "lab.yaml").unwrap_err();
        assert_eq!(
            (error.line(), error.field()),
            (Some(MAX_VIPS as usize + 2), &*format!("vips[{MAX_VIPS}]"))
        );
        assert!(error.to_string().contains("more than 1024 VIPs"));

        // 16 backends for each of the 1024 VIPs fill the backend table; one more overflows it.
        let per_vip = MAX_BACKENDS / MAX_VIPS;
        let mut text = String::from("vips:\n");
        for i in 0..MAX_VIPS {
            text += &format!(
                "  - address: 10.{}.{}.1\n    port: 80\n    backends:\n",
                i / 256 + 1,
                i % 256
            );
            for j in 0..(per_vip + u32::from(i == MAX_VIPS - 1)) {
                text += &format!("      - {{address: 172.16.{}.{}}}\n", j, 1 + i % 250);
            }
        }
        let error = parse(&text, "lab.yaml").unwrap_err();
        assert_eq!(
            error.field(),
            format!("vips[{}].backends[{per_vip}]", MAX_VIPS - 1)
        );
        assert_eq!(error.line(), Some(text.lines().count()));
        assert!(
            error
                .to_string()
                .contains("more than 16384 backends over all VIPs")
        );
    }

    #[test]
    fn hostile_yaml_is_an_error_not_a_panic() {
        for text in [
            "*x",
            "a: !!str 1",
            "? [a]\n: b",
            "{",
            "[",
            "\"",
            "vips: [[[]]]",
            "vips: {}",
            "\u{feff}vips: []",
            ":",
            "- - -",
        ] {
            let _ = parse(text, "x");
        }
    }

    #[test]
    fn load_reads_the_file_and_names_it() {
        let dir = std::env::temp_dir().join(format!("sluice-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lab.yaml");
        std::fs::write(
            &path,
            "vips:\n  - address: 10.0.0.1\n    port: 0\n    backends: []\n",
        )
        .unwrap();
        let error = load(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "{}:3: vips[0].port: 0 is out of range 1..=65535; {PORT_HINT}",
                path.display()
            )
        );
        std::fs::write(&path, "vips: []\n").unwrap();
        assert_eq!(load(&path), Ok(Desired::default()));
        std::fs::remove_dir_all(&dir).unwrap();

        let missing = dir.join("missing.yaml");
        let error = load(&missing).unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with(&format!("{}: cannot read the config: ", missing.display())),
            "{message}"
        );
        assert!(message.contains("No such file or directory"), "{message}");
        assert_eq!(error.line(), None);
    }
}
