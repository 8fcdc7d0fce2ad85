//! What the kernel knows about interfaces and neighbours, read the plain way (/sys, /proc).

use std::{
    fs,
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};

use crate::model::MacAddr;

/// An interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: MacAddr,
}

impl Interface {
    pub fn by_name(name: &str) -> anyhow::Result<Self> {
        let base = format!("/sys/class/net/{name}");
        let index = fs::read_to_string(format!("{base}/ifindex"))
            .map_err(|_| {
                anyhow!(
                    "interface {name:?} not found in this network namespace (`ip link` lists them)"
                )
            })?
            .trim()
            .parse()
            .with_context(|| format!("reading the ifindex of {name}"))?;
        let mac = fs::read_to_string(format!("{base}/address"))
            .with_context(|| format!("reading the MAC address of {name}"))?
            .trim()
            .parse()
            .map_err(|e| anyhow!("interface {name} has no Ethernet address: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            index,
            mac,
        })
    }
}

/// A resolved IPv4 neighbour: its MAC and the interface it is reached through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: MacAddr,
    pub device: String,
}

/// The kernel's ARP entry for `addr`, if complete.
pub fn neighbour(addr: Ipv4Addr) -> anyhow::Result<Option<Neighbour>> {
    let table = fs::read_to_string("/proc/net/arp").context("reading /proc/net/arp")?;
    Ok(parse_arp_table(&table, addr))
}

/// Resolves `addr` through the kernel: the neighbour table, or a datagram to the discard port
/// to make the kernel ARP for it, polled for up to `timeout`.
pub fn resolve_neighbour(addr: Ipv4Addr, timeout: Duration) -> anyhow::Result<Neighbour> {
    if let Some(n) = neighbour(addr)? {
        return Ok(n);
    }
    let socket =
        UdpSocket::bind("0.0.0.0:0").context("opening a UDP socket to resolve a neighbour")?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // The kernel answers "no route" for unreachable addresses: that is an answer too.
        if let Err(e) = socket.send_to(&[], SocketAddrV4::new(addr, 9)) {
            bail!("cannot reach {addr}: {e}");
        }
        thread::sleep(Duration::from_millis(50));
        if let Some(n) = neighbour(addr)? {
            return Ok(n);
        }
    }
    bail!("no ARP answer from {addr} within {timeout:?}")
}

/// Flags value of a complete ARP entry (ATF_COM).
const ATF_COM: u32 = 0x2;

fn parse_arp_table(table: &str, addr: Ipv4Addr) -> Option<Neighbour> {
    // "IP address  HW type  Flags  HW address  Mask  Device"
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [ip, _hw, flags, mac, _mask, device] = f.as_slice() else {
            return None;
        };
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        if ip.parse::<Ipv4Addr>().ok()? != addr || flags & ATF_COM == 0 {
            return None;
        }
        Some(Neighbour {
            mac: mac.parse().ok()?,
            device: (*device).to_owned(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str =
        "IP address       HW type     Flags       HW address            Mask     Device
10.0.0.11        0x1         0x2         02:5c:00:00:00:01     *        veth0
10.0.0.12        0x1         0x0         00:00:00:00:00:00     *        veth0
";

    #[test]
    fn complete_entries_only() {
        let n = parse_arp_table(TABLE, Ipv4Addr::new(10, 0, 0, 11)).expect("entry");
        assert_eq!(n.device, "veth0");
        assert_eq!(n.mac.to_string(), "02:5c:00:00:00:01");
        assert_eq!(parse_arp_table(TABLE, Ipv4Addr::new(10, 0, 0, 12)), None);
        assert_eq!(parse_arp_table(TABLE, Ipv4Addr::new(10, 0, 0, 13)), None);
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let e = Interface::by_name("nosuchif0").unwrap_err().to_string();
        assert!(e.contains("\"nosuchif0\" not found"), "{e}");
    }
}
