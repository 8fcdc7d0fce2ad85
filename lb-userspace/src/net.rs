//! What the kernel knows about interfaces, addresses, routes and neighbours, asked over
//! rtnetlink (see [`rtnl`]) in the calling thread's network namespace: no external program, so
//! the static binary works in an image that holds nothing else.

pub mod choose;
mod rtnl;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use netlink_packet_route::AddressFamily;

use self::rtnl::family_of;
use crate::model::MacAddr;

/// An interface of this network namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    pub mac: MacAddr,
    pub mtu: u32,
}

impl Interface {
    pub fn by_name(name: &str) -> anyhow::Result<Self> {
        let not_found = || {
            anyhow!("interface {name:?} not found in this network namespace (`ip link` lists them)")
        };
        // The kernel's limit (IFNAMSIZ with its NUL); it rejects longer names as invalid.
        if name.is_empty() || name.len() > 15 {
            return Err(not_found());
        }
        let link = rtnl::link_by_name(name).map_err(|e| match e.errno() {
            Some(libc::ENODEV) => not_found(),
            _ => anyhow!("reading interface {name:?} over netlink: {e}"),
        })?;
        let mac = link
            .address
            .as_deref()
            .and_then(|a| <[u8; 6]>::try_from(a).ok())
            .map(MacAddr)
            .ok_or_else(|| {
                anyhow!(
                    "interface {name} has no Ethernet address (link-layer address {})",
                    link.address
                        .as_deref()
                        .map_or_else(|| "none".to_owned(), hex)
                )
            })?;
        let mtu = link
            .mtu
            .ok_or_else(|| anyhow!("the kernel reported no MTU for interface {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            index: link.index,
            mac,
            mtu,
        })
    }

    /// Whether the interface can pass frames now: administratively up and with a carrier.
    pub fn is_up(&self) -> anyhow::Result<bool> {
        rtnl::link_by_index(self.index)
            .map(|link| link.up)
            .map_err(|e| anyhow!("reading interface {} over netlink: {e}", self.name))
    }

    /// The interface's global-scope addresses of both families.
    pub fn addresses(&self) -> anyhow::Result<Vec<IpAddr>> {
        let all = rtnl::addresses(AddressFamily::Unspec).map_err(|e| {
            anyhow!(
                "reading the addresses of interface {} (index {}) over netlink: {e}",
                self.name,
                self.index
            )
        })?;
        Ok(global_addresses(
            all.iter().filter(|a| a.index == self.index),
        ))
    }
}

/// The index of the interface that VLAN device `name` is on (its 802.1Q parent); `None` for any
/// other kind of interface (sysfs: `DEVTYPE=vlan` in its `uevent`, the parent in `iflink`).
pub fn vlan_parent(name: &str) -> Option<u32> {
    let dir = std::path::Path::new("/sys/class/net").join(name);
    let uevent = std::fs::read_to_string(dir.join("uevent")).ok()?;
    if !uevent.lines().any(|l| l == "DEVTYPE=vlan") {
        return None;
    }
    std::fs::read_to_string(dir.join("iflink"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every global-scope address of this network namespace.
pub fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let all = rtnl::addresses(AddressFamily::Unspec)
        .map_err(|e| anyhow!("reading this network namespace's addresses over netlink: {e}"))?;
    Ok(global_addresses(all.iter()))
}

/// Whether `addr` is one of this network namespace's addresses, of any scope but host (so
/// `127.0.0.1` and `::1` on `lo` are not, while an address of a link or a VIP on `lo` is).
pub fn is_local_address(addr: IpAddr) -> anyhow::Result<bool> {
    let family = family_of(addr);
    let all = rtnl::addresses(family).map_err(|e| {
        anyhow!("reading this network namespace's addresses over netlink (is {addr} local?): {e}")
    })?;
    Ok(all
        .iter()
        .any(|a| a.local == Some(addr) && a.scope != rtnl::RT_SCOPE_HOST))
}

fn global_addresses<'a>(addresses: impl Iterator<Item = &'a rtnl::Address>) -> Vec<IpAddr> {
    addresses
        .filter(|a| a.scope == rtnl::RT_SCOPE_UNIVERSE)
        .filter_map(|a| a.local)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A resolved neighbour: its MAC and the interface it is reached through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Neighbour {
    pub mac: MacAddr,
    pub device: String,
}

/// How the kernel routes to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The next hop when it is not the destination itself.
    pub gateway: Option<IpAddr>,
    pub device: String,
    /// The source address the kernel would use.
    pub source: Option<IpAddr>,
}

impl Route {
    pub fn next_hop(&self, dst: IpAddr) -> IpAddr {
        self.gateway.unwrap_or(dst)
    }
}

/// The name of the interface with index `index`, for messages that name `what`.
fn device_name(index: u32, what: &str) -> anyhow::Result<String> {
    rtnl::link_by_index(index)
        .map_err(|e| {
            anyhow!("{what}: reading the name of interface index {index} over netlink: {e}")
        })?
        .name
        .ok_or_else(|| anyhow!("{what}: the kernel reported no name for interface index {index}"))
}

/// The kernel's route to `addr` (what `ip route get ADDR` shows).
pub fn route_to(addr: IpAddr) -> anyhow::Result<Route> {
    let entry = rtnl::route_get(addr).map_err(|e| anyhow!("no route to {addr}: {e}"))?;
    let oif = entry
        .oif
        .ok_or_else(|| anyhow!("no route to {addr}: the kernel's answer names no device"))?;
    Ok(Route {
        gateway: entry.gateway,
        device: device_name(oif, &format!("the route to {addr}"))?,
        source: entry.prefsrc,
    })
}

/// The kernel's neighbour entry for `addr`, if it holds a usable MAC.
pub fn neighbour(addr: IpAddr) -> anyhow::Result<Option<Neighbour>> {
    let entries = rtnl::neighbours(family_of(addr))
        .map_err(|e| anyhow!("reading the neighbour table for {addr} over netlink: {e}"))?;
    let Some((ifindex, mac)) = usable_neighbour(&entries, addr) else {
        return Ok(None);
    };
    Ok(Some(Neighbour {
        mac,
        device: device_name(ifindex, &format!("the neighbour entry of {addr}"))?,
    }))
}

/// Neighbour states whose MAC can be used (INCOMPLETE and FAILED have none).
const USABLE_STATES: u16 = rtnl::NUD_REACHABLE
    | rtnl::NUD_STALE
    | rtnl::NUD_DELAY
    | rtnl::NUD_PROBE
    | rtnl::NUD_PERMANENT
    | rtnl::NUD_NOARP;

/// The interface index and MAC of the first entry for `addr` in a usable state with an Ethernet
/// address.
fn usable_neighbour(entries: &[rtnl::NeighbourEntry], addr: IpAddr) -> Option<(u32, MacAddr)> {
    entries.iter().find_map(|entry| {
        if entry.dst != Some(addr) || entry.state & USABLE_STATES == 0 {
            return None;
        }
        let mac = <[u8; 6]>::try_from(entry.lladdr.as_deref()?).ok()?;
        Some((entry.ifindex, MacAddr(mac)))
    })
}

/// Resolves the MAC of `addr` on a directly connected network: the neighbour table, or a
/// datagram to the discard port to make the kernel ARP (or solicit) for it, polled for up to
/// `timeout`.
pub fn resolve_neighbour(addr: IpAddr, timeout: Duration) -> anyhow::Result<Neighbour> {
    resolve(addr, addr, timeout)
}

/// Resolves how to reach `addr` over L3: the route, then the next hop's MAC.
pub fn resolve_next_hop(addr: IpAddr, timeout: Duration) -> anyhow::Result<(Route, Neighbour)> {
    let route = route_to(addr)?;
    let hop = route.next_hop(addr);
    let neighbour = resolve(addr, hop, timeout)?;
    Ok((route, neighbour))
}

/// How often both sources (`sluice run`, `sluice agent`) apply their running model again
/// although it did not change: neighbours and routes move under the same address (a node's new
/// NIC or MAC, a failed-over gateway), and a reconcile reads them afresh and writes only what
/// changed. The kernel learns the new MAC (a gratuitous ARP, its own traffic to the node);
/// this is how long the maps may lag behind it.
pub const NEXT_HOP_REFRESH: Duration = Duration::from_secs(30);

/// How often the next hops found by earlier applies are forgotten and asked of the kernel
/// again ([`NextHopRefresh`]: the refresh pass pays for that, not the applies of changes,
/// which reuse them); the maps lag the kernel by at most [`NEXT_HOP_REFRESH`].
pub const NEXT_HOP_MAX_AGE: Duration = Duration::from_secs(NEXT_HOP_REFRESH.as_secs() / 2);

/// When the running model is due to be applied again, afresh (next hops asked again, the maps
/// read back): every [`NEXT_HOP_MAX_AGE`], whatever other applies ran meanwhile.
#[derive(Debug)]
pub struct NextHopRefresh {
    last: Instant,
}

impl Default for NextHopRefresh {
    fn default() -> Self {
        Self {
            last: Instant::now(),
        }
    }
}

impl NextHopRefresh {
    /// How long until a refresh is due (zero: it is).
    pub fn wait(&self) -> Duration {
        NEXT_HOP_MAX_AGE.saturating_sub(self.last.elapsed())
    }

    /// Whether a refresh is due; one that is restarts the period.
    pub fn due(&mut self) -> bool {
        let due = self.wait().is_zero();
        if due {
            self.resolved();
        }
        due
    }

    fn resolved(&mut self) {
        self.last = Instant::now();
    }
}

/// Sends to `dst` (whose route goes through `hop`) until `hop`'s MAC is known.
fn resolve(dst: IpAddr, hop: IpAddr, timeout: Duration) -> anyhow::Result<Neighbour> {
    if let Some(n) = neighbour(hop)? {
        return Ok(n);
    }
    let bind: SocketAddr = if dst.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let socket = UdpSocket::bind(bind)
        .with_context(|| format!("opening a UDP socket to resolve the neighbour {hop}"))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        // The kernel answers "no route" for unreachable addresses: that is an answer too.
        if let Err(e) = socket.send_to(&[], SocketAddr::new(dst, 9)) {
            bail!("cannot reach {dst}: {e}");
        }
        thread::sleep(Duration::from_millis(50));
        if let Some(n) = neighbour(hop)? {
            return Ok(n);
        }
    }
    bail!("no ARP/neighbour answer from {hop} within {timeout:?}")
}

/// Sends one gratuitous ARP ("`addr` is at this interface's MAC", a broadcast request with
/// sender and target both `addr`) out of `iface`, through a raw packet socket: neighbours that
/// have `addr` cached move to our MAC at once, and switches learn where the MAC is.
pub fn send_gratuitous_arp(iface: &Interface, addr: std::net::Ipv4Addr) -> anyhow::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let mac = iface.mac.0;
    let mut frame = Vec::with_capacity(60);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet, IPv4, address lengths 6 and 4, request.
    frame.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&addr.octets());
    frame.resize(60, 0);

    send_raw(iface, ETH_P_ARP, &frame, [0xff; 6])
        .map_err(|e| anyhow::anyhow!("sending gratuitous ARP for {addr} on {}: {e}", iface.name))
}

/// Sends one unsolicited Neighbor Advertisement ("`addr` is at this interface's MAC", Override
/// set, to all nodes) out of `iface`: IPv6's gratuitous ARP (RFC 4861 7.2.6). Neighbours that
/// have `addr` cached take our MAC at once (as STALE, then confirmed on use).
pub fn send_unsolicited_na(iface: &Interface, addr: std::net::Ipv6Addr) -> anyhow::Result<()> {
    const ETH_P_IPV6: u16 = 0x86dd;
    let frame = unsolicited_na(iface.mac.0, addr);
    send_raw(iface, ETH_P_IPV6, &frame, ALL_NODES_MAC).map_err(|e| {
        anyhow::anyhow!(
            "sending an unsolicited neighbour advertisement for {addr} on {}: {e}",
            iface.name
        )
    })
}

/// The Ethernet address of ff02::1 (all nodes): 33:33 and the group's low 32 bits.
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// The frame of [`send_unsolicited_na`]: from `addr` to ff02::1, hop limit 255, ICMPv6 136
/// with only Override set, target `addr`, Target Link-Layer Address option `mac`.
pub fn unsolicited_na(mac: [u8; 6], addr: std::net::Ipv6Addr) -> Vec<u8> {
    const ICMPV6_LEN: u16 = 32;
    let all_nodes = std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut icmp = Vec::with_capacity(usize::from(ICMPV6_LEN));
    // Type 136, code 0, checksum (below), flags: Override only (nobody solicited it).
    icmp.extend_from_slice(&[136, 0, 0, 0, 0x20, 0, 0, 0]);
    icmp.extend_from_slice(&addr.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&mac);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(&addr.octets());
    pseudo.extend_from_slice(&all_nodes.octets());
    pseudo.extend_from_slice(&u32::from(ICMPV6_LEN).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&icmp);
    let sum = internet_checksum(&pseudo);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut frame = Vec::with_capacity(86);
    frame.extend_from_slice(&ALL_NODES_MAC);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&0x86ddu16.to_be_bytes());
    // Version 6, no traffic class or flow label; payload length; ICMPv6; hop limit 255.
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&ICMPV6_LEN.to_be_bytes());
    frame.extend_from_slice(&[58, 255]);
    frame.extend_from_slice(&addr.octets());
    frame.extend_from_slice(&all_nodes.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// RFC 1071 over an even number of bytes, ready to store.
fn internet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends `frame` (Ethernet header included) out of `iface` through a raw packet socket.
fn send_raw(iface: &Interface, proto: u16, frame: &[u8], dst_mac: [u8; 6]) -> anyhow::Result<()> {
    // SAFETY: plain socket call; the descriptor is owned (and closed) right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto.to_be()),
        )
    };
    if fd < 0 {
        bail!(
            "opening a packet socket: {} (needs CAP_NET_RAW)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = proto.to_be();
    to.sll_ifindex = iface.index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&dst_mac);
    // SAFETY: the buffer and address outlive the call; lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if sent < 0 {
        bail!("{}", std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(dst: &str, ifindex: u32, state: u16, lladdr: Option<[u8; 6]>) -> rtnl::NeighbourEntry {
        rtnl::NeighbourEntry {
            ifindex,
            state,
            dst: Some(dst.parse().unwrap()),
            lladdr: lladdr.map(|m| m.to_vec()),
        }
    }

    #[test]
    fn unsolicited_na_bytes_and_checksum() {
        let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee];
        let frame = unsolicited_na(mac, "fd00:100::1".parse().unwrap());
        assert_eq!(frame.len(), 86);
        assert_eq!(
            &frame[..14],
            &[
                0x33, 0x33, 0, 0, 0, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x86, 0xdd
            ]
        );
        assert_eq!(&frame[14..22], &[0x60, 0, 0, 0, 0, 32, 58, 255]);
        assert_eq!(
            &frame[38..54],
            &[0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        // Checksum computed independently (Python, RFC 1071 over the pseudo-header).
        assert_eq!(&frame[54..62], &[136, 0, 0xbe, 0x36, 0x20, 0, 0, 0]);
        assert_eq!(&frame[78..86], &[2, 1, 2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    }

    #[test]
    fn usable_neighbour_entries_only() {
        let mac1 = [2, 0x5c, 0, 0, 0, 1];
        let mac2 = [2, 0x5c, 0, 0, 0, 2];
        let entries = [
            entry("10.0.0.10", 3, rtnl::NUD_FAILED, Some(mac1)),
            entry("10.0.0.11", 3, rtnl::NUD_REACHABLE, Some(mac1)),
            entry("10.0.0.12", 3, rtnl::NUD_INCOMPLETE, None),
            entry("10.0.0.14", 3, rtnl::NUD_PERMANENT, None),
            entry("fd00::12", 4, rtnl::NUD_STALE, Some(mac2)),
            entry("10.0.0.15", 3, rtnl::NUD_INCOMPLETE, Some(mac1)),
            entry("10.0.0.15", 5, rtnl::NUD_DELAY, Some(mac2)),
            entry("10.0.0.16", 3, rtnl::NUD_NOARP, Some(mac2)),
        ];
        let at = |a: &str| usable_neighbour(&entries, a.parse().unwrap());
        assert_eq!(at("10.0.0.11"), Some((3, MacAddr(mac1))));
        assert_eq!(at("10.0.0.10"), None, "FAILED");
        assert_eq!(at("10.0.0.12"), None, "INCOMPLETE");
        assert_eq!(at("10.0.0.13"), None, "absent");
        assert_eq!(at("10.0.0.14"), None, "no link-layer address");
        assert_eq!(at("fd00::12"), Some((4, MacAddr(mac2))));
        assert_eq!(
            at("10.0.0.15"),
            Some((5, MacAddr(mac2))),
            "the usable one of two"
        );
        assert_eq!(at("10.0.0.16"), Some((3, MacAddr(mac2))), "NOARP");
    }

    #[test]
    fn routes_with_and_without_gateway() {
        let via = Route {
            gateway: Some("10.0.0.1".parse().unwrap()),
            device: "eth0".into(),
            source: None,
        };
        assert_eq!(
            via.next_hop("10.1.0.2".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
        let direct = Route {
            gateway: None,
            device: "eth1".into(),
            source: Some("fd00::1".parse().unwrap()),
        };
        let dst: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(direct.next_hop(dst), dst);
    }

    #[test]
    fn global_addresses_only() {
        let address = |index, scope, local: &str| rtnl::Address {
            index,
            scope,
            local: Some(local.parse().unwrap()),
        };
        let all = [
            address(1, rtnl::RT_SCOPE_HOST, "127.0.0.1"),
            address(2, rtnl::RT_SCOPE_UNIVERSE, "10.0.0.2"),
            address(2, rtnl::RT_SCOPE_UNIVERSE, "fd00::2"),
            address(2, 253, "fe80::1"),
        ];
        assert_eq!(
            global_addresses(all.iter()),
            vec![
                "10.0.0.2".parse::<IpAddr>().unwrap(),
                "fd00::2".parse().unwrap()
            ]
        );
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        let e = Interface::by_name("nosuchif0").unwrap_err().to_string();
        assert!(e.contains("\"nosuchif0\" not found"), "{e}");
        let e = Interface::by_name("a-name-longer-than-ifnamsiz")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
    }

    #[test]
    fn loopback_is_no_local_address_but_reads() {
        // lo exists in every network namespace; reading it needs no privilege.
        let lo = Interface::by_name("lo").unwrap();
        assert_eq!(lo.index, 1);
        assert!(lo.mac.is_zero());
        assert!(!is_local_address("127.0.0.1".parse().unwrap()).unwrap());
        assert!(!is_local_address("::1".parse().unwrap()).unwrap());
        for addr in local_addresses().unwrap() {
            assert!(is_local_address(addr).unwrap(), "{addr}");
        }
    }
}
