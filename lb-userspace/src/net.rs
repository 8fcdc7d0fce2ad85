//! What the kernel knows about interfaces, routes and neighbours: /sys for interfaces, and
//! iproute2's JSON output (`ip -j`) for addresses, routes and the neighbour tables of both
//! families, which have no /proc file of their own for IPv6.

use std::{
    fs,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use serde_json::Value;

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
        let base = format!("/sys/class/net/{name}");
        let read = |file: &str| {
            fs::read_to_string(format!("{base}/{file}")).map(|text| text.trim().to_owned())
        };
        let index = read("ifindex")
            .map_err(|_| {
                anyhow!(
                    "interface {name:?} not found in this network namespace (`ip link` lists them)"
                )
            })?
            .parse()
            .with_context(|| format!("reading the ifindex of {name}"))?;
        let mac = read("address")
            .with_context(|| format!("reading the MAC address of {name}"))?
            .parse()
            .map_err(|e| anyhow!("interface {name} has no Ethernet address: {e}"))?;
        let mtu = read("mtu")
            .with_context(|| format!("reading the MTU of {name}"))?
            .parse()
            .with_context(|| format!("reading the MTU of {name}"))?;
        Ok(Self {
            name: name.to_owned(),
            index,
            mac,
            mtu,
        })
    }

    /// The interface's global-scope addresses of both families.
    pub fn addresses(&self) -> anyhow::Result<Vec<IpAddr>> {
        let json = ip_json(&["addr", "show", "dev", &self.name])?;
        Ok(parse_addresses(&json))
    }
}

/// Every global-scope address of this network namespace.
pub fn local_addresses() -> anyhow::Result<Vec<IpAddr>> {
    Ok(parse_addresses(&ip_json(&["addr", "show"])?))
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

/// Runs `ip -j ARGS` and parses its output.
fn ip_json(args: &[&str]) -> anyhow::Result<Value> {
    let output = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running `ip` (iproute2) to read the kernel's network state")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

/// The kernel's route to `addr`.
pub fn route_to(addr: IpAddr) -> anyhow::Result<Route> {
    let json = ip_json(&["route", "get", &addr.to_string()])
        .map_err(|e| anyhow!("no route to {addr}: {e}"))?;
    parse_route(&json).ok_or_else(|| anyhow!("no route to {addr}"))
}

/// The kernel's neighbour entry for `addr`, if it holds a usable MAC.
pub fn neighbour(addr: IpAddr) -> anyhow::Result<Option<Neighbour>> {
    let json = ip_json(&["neigh", "show", "to", &addr.to_string()])?;
    Ok(parse_neighbour(&json, addr))
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
    let socket = UdpSocket::bind(bind).context("opening a UDP socket to resolve a neighbour")?;
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

fn parse_addresses(json: &Value) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for link in json.as_array().into_iter().flatten() {
        for info in link["addr_info"].as_array().into_iter().flatten() {
            if info["scope"].as_str() != Some("global") {
                continue;
            }
            if let Some(addr) = info["local"].as_str().and_then(|a| a.parse().ok()) {
                out.push(addr);
            }
        }
    }
    out
}

fn parse_route(json: &Value) -> Option<Route> {
    let route = json.as_array()?.first()?;
    let addr = |key: &str| route[key].as_str().and_then(|a| a.parse::<IpAddr>().ok());
    Some(Route {
        gateway: addr("gateway"),
        device: route["dev"].as_str()?.to_owned(),
        source: addr("prefsrc"),
    })
}

/// Neighbour states whose MAC can be used (INCOMPLETE and FAILED have none).
const USABLE_STATES: &[&str] = &["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT", "NOARP"];

fn parse_neighbour(json: &Value, addr: IpAddr) -> Option<Neighbour> {
    json.as_array()?.iter().find_map(|entry| {
        if entry["dst"].as_str()?.parse::<IpAddr>().ok()? != addr {
            return None;
        }
        let usable = entry["state"]
            .as_array()?
            .iter()
            .any(|s| s.as_str().is_some_and(|s| USABLE_STATES.contains(&s)));
        if !usable {
            return None;
        }
        Some(Neighbour {
            mac: entry["lladdr"].as_str()?.parse().ok()?,
            device: entry["dev"].as_str()?.to_owned(),
        })
    })
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

    // SAFETY: plain socket call; the descriptor is owned (and closed) right after.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(ETH_P_ARP.to_be()),
        )
    };
    if fd < 0 {
        bail!(
            "opening a packet socket for gratuitous ARP: {} (needs CAP_NET_RAW)",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = ETH_P_ARP.to_be();
    to.sll_ifindex = iface.index as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
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
        bail!(
            "sending gratuitous ARP for {addr} on {}: {}",
            iface.name,
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usable_neighbour_entries_only() {
        let json: Value = serde_json::from_str(
            r#"[{"dst":"10.0.0.11","dev":"veth0","lladdr":"02:5c:00:00:00:01","state":["REACHABLE"]},
                {"dst":"10.0.0.12","dev":"veth0","state":["INCOMPLETE"]},
                {"dst":"fd00::12","dev":"veth1","lladdr":"02:5c:00:00:00:02","state":["STALE"]}]"#,
        )
        .unwrap();
        let n = parse_neighbour(&json, "10.0.0.11".parse().unwrap()).expect("entry");
        assert_eq!(n.device, "veth0");
        assert_eq!(n.mac.to_string(), "02:5c:00:00:00:01");
        assert_eq!(parse_neighbour(&json, "10.0.0.12".parse().unwrap()), None);
        assert_eq!(parse_neighbour(&json, "10.0.0.13".parse().unwrap()), None);
        let v6 = parse_neighbour(&json, "fd00::12".parse().unwrap()).expect("v6 entry");
        assert_eq!(v6.device, "veth1");
    }

    #[test]
    fn routes_with_and_without_gateway() {
        let via: Value = serde_json::from_str(
            r#"[{"dst":"10.1.0.2","gateway":"10.0.0.1","dev":"eth0","prefsrc":"10.0.0.2","flags":[]}]"#,
        )
        .unwrap();
        let route = parse_route(&via).unwrap();
        assert_eq!(route.gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(route.device, "eth0");
        assert_eq!(
            route.next_hop("10.1.0.2".parse().unwrap()),
            route.gateway.unwrap()
        );
        let direct: Value =
            serde_json::from_str(r#"[{"dst":"fd00::2","dev":"eth1","prefsrc":"fd00::1"}]"#)
                .unwrap();
        let route = parse_route(&direct).unwrap();
        let dst: IpAddr = "fd00::2".parse().unwrap();
        assert_eq!(route.next_hop(dst), dst);
        assert_eq!(route.source, Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn global_addresses_only() {
        let json: Value = serde_json::from_str(
            r#"[{"ifname":"eth0","addr_info":[
                {"family":"inet","local":"10.0.0.2","prefixlen":24,"scope":"global"},
                {"family":"inet6","local":"fd00::2","prefixlen":64,"scope":"global"},
                {"family":"inet6","local":"fe80::1","prefixlen":64,"scope":"link"}]}]"#,
        )
        .unwrap();
        let addrs = parse_addresses(&json);
        assert_eq!(
            addrs,
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
    }
}
