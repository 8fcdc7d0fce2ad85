//! `lb_userspace::net` asks the kernel over rtnetlink, not through iproute2: here it runs in a
//! namespace of its own (a thread moved there with setns) and must agree with what `ip` reports
//! about the same namespace: addresses, routes through a gateway, a permanent neighbour entry,
//! and a neighbour resolved by a real ARP / neighbour-discovery answer from the peer namespace.
//! Needs root.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use lb_userspace::{model::MacAddr, net};
use serde_json::Value;
use sluice_tests::{cmd, netns, require_root};

const GATEWAY_MAC: &str = "02:00:00:77:00:fe";

/// Two namespaces `nlt-<pid>-a` and `nlt-<pid>-b` joined by a veth pair (`va` in a, `vb` in b),
/// removed on drop whatever happened in between.
struct Pair {
    a: String,
    b: String,
}

impl Pair {
    fn build() -> Result<Pair> {
        let pid = std::process::id();
        let pair = Pair {
            a: format!("nlt-{pid}-a"),
            b: format!("nlt-{pid}-b"),
        };
        // A namespace of that name can only be left by an earlier process with our pid.
        pair.remove();
        cmd::sh(&["ip", "netns", "add", &pair.a])?;
        cmd::sh(&["ip", "netns", "add", &pair.b])?;
        let (a, b) = (pair.a.as_str(), pair.b.as_str());
        for argv in [
            &[
                "ip", "-n", a, "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns",
                b,
            ][..],
            &["ip", "-n", a, "addr", "add", "10.77.0.1/24", "dev", "va"],
            &[
                "ip",
                "-n",
                a,
                "addr",
                "add",
                "fd77::1/64",
                "dev",
                "va",
                "nodad",
            ],
            // A VIP-like global address on lo: local, though not on the veth.
            &["ip", "-n", a, "addr", "add", "10.79.0.1/32", "dev", "lo"],
            &["ip", "-n", b, "addr", "add", "10.77.0.2/24", "dev", "vb"],
            &[
                "ip",
                "-n",
                b,
                "addr",
                "add",
                "fd77::2/64",
                "dev",
                "vb",
                "nodad",
            ],
            &["ip", "-n", a, "link", "set", "lo", "up"],
            &["ip", "-n", b, "link", "set", "lo", "up"],
            &["ip", "-n", a, "link", "set", "va", "up"],
            &["ip", "-n", b, "link", "set", "vb", "up"],
            &[
                "ip",
                "-n",
                a,
                "route",
                "add",
                "10.78.0.0/24",
                "via",
                "10.77.0.254",
            ],
            &[
                "ip",
                "-n",
                a,
                "-6",
                "route",
                "add",
                "fd78::/64",
                "via",
                "fd77::fe",
            ],
            &[
                "ip",
                "-n",
                a,
                "neigh",
                "add",
                "10.77.0.254",
                "lladdr",
                GATEWAY_MAC,
                "dev",
                "va",
                "nud",
                "permanent",
            ],
            &[
                "ip",
                "-n",
                a,
                "-6",
                "neigh",
                "add",
                "fd77::fe",
                "lladdr",
                GATEWAY_MAC,
                "dev",
                "va",
                "nud",
                "permanent",
            ],
        ] {
            cmd::sh(argv)?;
        }
        Ok(pair)
    }

    /// `ip -j ARGS` in namespace `ns`, parsed.
    fn ip_json(&self, ns: &str, args: &[&str]) -> Result<Value> {
        let mut argv = vec!["ip", "-n", ns, "-j"];
        argv.extend_from_slice(args);
        let out = cmd::sh(&argv)?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("`{}` printed no JSON", argv.join(" ")))
    }

    /// The IPv6 link-local address of `dev` in `ns`, which the kernel adds once the link has
    /// carrier (asynchronously after both ends are up).
    fn link_local(&self, ns: &str, dev: &str) -> Result<IpAddr> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let json = self.ip_json(ns, &["-6", "addr", "show", "dev", dev, "scope", "link"])?;
            // iproute2 prints the addresses its scope filter drops as `{}`.
            let found = json[0]["addr_info"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|info| info["scope"] == "link")
                .and_then(|info| info["local"].as_str());
            if let Some(addr) = found {
                return Ok(ip(addr));
            }
            ensure!(
                Instant::now() < deadline,
                "{dev} in {ns} has no IPv6 link-local address after 5 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn remove(&self) {
        for ns in [&self.a, &self.b] {
            if netns::path(ns).exists()
                && let Err(e) = cmd::sh(&["ip", "netns", "del", ns])
            {
                eprintln!("netlink test: cannot delete namespace {ns}: {e:#}");
            }
        }
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.remove();
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("an IP address")
}

fn mac(value: &Value) -> Result<MacAddr> {
    value
        .as_str()
        .context("no MAC in ip's output")?
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The global-scope addresses `ip -j addr show [dev DEV]` reports.
fn global_addresses(json: &Value) -> BTreeSet<IpAddr> {
    json.as_array()
        .into_iter()
        .flatten()
        .flat_map(|link| link["addr_info"].as_array().into_iter().flatten())
        .filter(|info| info["scope"] == "global")
        .filter_map(|info| info["local"].as_str().and_then(|a| a.parse().ok()))
        .collect()
}

#[test]
fn net_agrees_with_iproute2_inside_a_namespace() -> Result<()> {
    require_root();
    let pair = Pair::build()?;
    let a = pair.a.clone();

    // What iproute2 says about namespace a (and the peer's MAC in b).
    let ip_all = global_addresses(&pair.ip_json(&a, &["addr", "show"])?);
    let ip_va_addrs = global_addresses(&pair.ip_json(&a, &["addr", "show", "dev", "va"])?);
    let va = pair.ip_json(&a, &["link", "show", "dev", "va"])?[0].clone();
    let vb = pair.ip_json(&pair.b, &["link", "show", "dev", "vb"])?[0].clone();
    let peer_mac = mac(&vb["address"])?;
    let link_local = pair.link_local(&a, "va")?;
    let ip_routes = [
        pair.ip_json(&a, &["route", "get", "10.78.0.5"])?,
        pair.ip_json(&a, &["route", "get", "fd78::5"])?,
        pair.ip_json(&a, &["route", "get", "10.77.0.2"])?,
    ];

    ensure!(
        ip_all.contains(&ip("10.77.0.1")) && ip_all.contains(&ip("10.79.0.1")),
        "the namespace was not set up as expected: {ip_all:?}"
    );

    netns::run_in(&a, move || {
        // Addresses.
        let ours: BTreeSet<IpAddr> = net::local_addresses()?.into_iter().collect();
        ensure!(ours == ip_all, "local_addresses: {ours:?}, ip: {ip_all:?}");

        let iface = net::Interface::by_name("va")?;
        ensure!(
            u64::from(iface.index) == va["ifindex"].as_u64().unwrap_or_default()
                && iface.mac == mac(&va["address"])?
                && u64::from(iface.mtu) == va["mtu"].as_u64().unwrap_or_default(),
            "Interface::by_name(va) = {iface:?}, ip: {va}"
        );
        let va_addrs: BTreeSet<IpAddr> = iface.addresses()?.into_iter().collect();
        ensure!(
            va_addrs == ip_va_addrs,
            "va's addresses: {va_addrs:?}, ip: {ip_va_addrs:?}"
        );
        let e = net::Interface::by_name("vb").unwrap_err().to_string();
        ensure!(
            e.contains("\"vb\" not found"),
            "vb lives in the other namespace: {e}"
        );

        // is_local_address: any scope but host.
        for (addr, local) in [
            ("10.77.0.1", true),
            ("fd77::1", true),
            ("10.79.0.1", true),
            ("10.77.0.2", false),
            ("127.0.0.1", false),
            ("::1", false),
        ] {
            ensure!(
                net::is_local_address(ip(addr))? == local,
                "is_local_address({addr}) should be {local}"
            );
        }
        ensure!(
            net::is_local_address(link_local)?,
            "the link-local {link_local} is local"
        );

        // Routes: the same gateway, device and source as `ip route get`.
        for (dst, json) in ["10.78.0.5", "fd78::5", "10.77.0.2"].iter().zip(&ip_routes) {
            let route = net::route_to(ip(dst))?;
            let expected = &json[0];
            ensure!(
                route.gateway == expected["gateway"].as_str().map(ip)
                    && expected["dev"] == route.device.as_str()
                    && route.source == expected["prefsrc"].as_str().map(ip),
                "route_to({dst}) = {route:?}, ip: {expected}"
            );
        }
        let via = net::route_to(ip("10.78.0.5"))?;
        ensure!(
            via.gateway == Some(ip("10.77.0.254")) && via.device == "va",
            "route_to(10.78.0.5) = {via:?}"
        );
        let e = net::route_to(ip("192.0.2.1")).unwrap_err().to_string();
        ensure!(
            e.contains("no route to 192.0.2.1"),
            "an unroutable address: {e}"
        );

        // The permanent neighbour entries.
        let gateway: MacAddr = GATEWAY_MAC.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
        for hop in ["10.77.0.254", "fd77::fe"] {
            let n = net::neighbour(ip(hop))?.with_context(|| format!("no entry for {hop}"))?;
            ensure!(
                n.mac == gateway && n.device == "va",
                "neighbour({hop}) = {n:?}"
            );
        }
        let (route, hop) = net::resolve_next_hop(ip("fd78::7"), Duration::from_secs(1))?;
        ensure!(
            route.gateway == Some(ip("fd77::fe")) && hop.mac == gateway,
            "resolve_next_hop(fd78::7) = {route:?}, {hop:?}"
        );

        // Resolved by a real answer from namespace b, in both families.
        for peer in ["10.77.0.2", "fd77::2"] {
            let n = net::resolve_neighbour(ip(peer), Duration::from_secs(5))?;
            ensure!(
                n.mac == peer_mac && n.device == "va",
                "resolve_neighbour({peer}) = {n:?}, b's vb is {peer_mac}"
            );
        }
        let e = net::resolve_neighbour(ip("10.77.0.99"), Duration::from_millis(500))
            .unwrap_err()
            .to_string();
        ensure!(
            e.contains("10.77.0.99"),
            "nobody answers for 10.77.0.99: {e}"
        );
        Ok(())
    })?;

    // What the kernel learnt by resolving is what `ip neigh` shows.
    for peer in ["10.77.0.2", "fd77::2"] {
        let entries = pair.ip_json(&a, &["neigh", "show", "to", peer])?;
        let entry = &entries[0];
        ensure!(
            entry["dev"] == "va" && mac(&entry["lladdr"])? == peer_mac,
            "ip neigh show to {peer}: {entries}"
        );
    }
    Ok(())
}
