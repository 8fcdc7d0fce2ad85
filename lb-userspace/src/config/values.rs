//! The value rules: what counts as an address, a prefix, a MAC, a protocol or a Maglev table
//! size, each with an error that says what to write instead.

use std::net::IpAddr;

use lb_common::{DEFAULT_MAGLEV_SIZE, MAX_MAGLEV_SIZE};

use super::yaml::{Checker, Field};
use super::{MAC_HINT, MIN_MAGLEV_SIZE, Result, UNICAST_MAC_HINT};
use crate::maglev::is_prime;
use crate::model::{IpNet, MacAddr, Protocol};

/// Why `addr` cannot be a VIP or a backend, if it cannot.
pub(super) fn not_unicast(addr: IpAddr) -> Option<&'static str> {
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

impl Checker<'_> {
    pub(super) fn protocol(&self, field: &Field<'_>) -> Result<Protocol> {
        const HINT: &str = "use tcp or udp (the default is tcp)";
        let text = self.text(field, "tcp or udp", HINT)?;
        text.parse()
            .map_err(|_| self.error_at(field, format!("unknown protocol {text:?}"), HINT))
    }

    pub(super) fn unicast_addr(&self, field: &Field<'_>) -> Result<IpAddr> {
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
    pub(super) fn prefix(&self, field: &Field<'_>, family: Option<u8>) -> Result<IpNet> {
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

    pub(super) fn mac(&self, field: &Field<'_>) -> Result<MacAddr> {
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

    pub(super) fn maglev_table_size(&self, field: &Field<'_>) -> Result<u32> {
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
