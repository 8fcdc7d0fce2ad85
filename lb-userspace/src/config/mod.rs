//! The static configuration file: YAML in, a validated [`Desired`] out.
//!
//! ```yaml
//! maglev_table_size: 65537        # optional; a prime from 7 to 1000003 for every VIP; default:
//!                                 #   per VIP, the smallest of 251, 509, ..., 65537 over 1000 x
//!                                 #   its backends
//! flow_table_size: 1048576        # optional; 1024 to 67108864 entries; default 1048576
//!                                 #   (second-chance mode creates 1024: it records no flow)
//! encap_source_v4: 10.99.0.0/24   # optional; outer sources of IPIP packets (host part varies
//! encap_source_v6: fd99::/120     #   per flow); default: the egress interface's address
//! max_new_flows_per_cpu: 125000   # optional; the flood guard (new flows recorded per second
//!                                 #   and CPU; above it Maglev's pick alone); 0: no limit
//! flow_state: table               # optional; table (default: a connection-table entry per
//!                                 #   flow), second-chance (none; conntrack decides) or auto
//!                                 #   (second chance where conntrack tracks this node's flows)
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

use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;

use lb_common::{DEFAULT_MAGLEV_SIZE, MAX_MAGLEV_SIZE};
use marked_yaml::LoaderOptions;

use crate::maglev::is_prime;
use crate::model::{Desired, Settings};

mod schema;
mod values;
mod yaml;

use yaml::Checker;

/// Smallest Maglev table: the prime the paper's examples start from. Real ones are far larger.
const MIN_MAGLEV_SIZE: u32 = 7;
const FLOW_TABLE_SIZES: RangeInclusive<u32> = lb_common::MIN_FLOW_TABLE_SIZE..=64 << 20;

const SYNTAX_HINT: &str = "check the indentation (spaces only, each child indented under its \
     key) and the `key: value` and `- item` forms";
const PORT_HINT: &str = "use a port from 1 to 65535";
const WEIGHT_HINT: &str =
    "a weight is a share relative to the other backends; 0 takes no new flows";
const FLOW_TABLE_HINT: &str = "size it to about the number of concurrent flows";
const NEW_FLOWS_HINT: &str =
    "new flows recorded per second and CPU before the flood guard holds; 0 for no limit";
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

/// Checks table sizes given outside a config file (the agent's flags), with the file's limits.
pub fn validate_settings(settings: &Settings) -> std::result::Result<(), String> {
    if let Some(size) = settings.maglev_table_size
        && (!(MIN_MAGLEV_SIZE..=MAX_MAGLEV_SIZE).contains(&size) || !is_prime(size))
    {
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

#[cfg(test)]
mod tests;
