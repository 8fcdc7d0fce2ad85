//! Which interface the agent attaches to: clusters mix `eno1`, `enp3s0`, `eth0`, bonds and VLANs,
//! so one name for the whole cluster (the ConfigMap's `iface`) does not fit every node. In order:
//! the Node's `sluice.io/iface` annotation (a per-node override), a name given by `--iface`, or
//! with `--iface auto` the interface that carries one of the Node's InternalIP addresses (per
//! family, as the kernel has them), else the one of the default route. The choice and why are
//! logged and shown in `/readyz`.

use std::net::IpAddr;

use anyhow::{anyhow, bail};

use super::{Interface, rtnl};

/// The Node annotation that names this node's interface, whatever `--iface` says.
pub const IFACE_ANNOTATION: &str = "sluice.io/iface";
/// `--iface auto`.
pub const AUTO: &str = "auto";
/// Where the default routes are looked up (any global address works: the kernel answers from its
/// table, nothing is sent).
const PROBE_V4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
const PROBE_V6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

/// What the kernel and the Node say, for [`choose`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The Node's `sluice.io/iface` annotation.
    pub annotation: Option<String>,
    /// The Node's InternalIP addresses.
    pub node_ips: Vec<IpAddr>,
    /// Every address of this namespace with its interface's index and name.
    pub addresses: Vec<(IpAddr, u32, String)>,
    /// The interfaces of the default routes (IPv4 first), by name.
    pub default_routes: Vec<String>,
}

/// The chosen interface's name and why, as the log and `/readyz` say it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub name: String,
    pub why: String,
}

/// Decides from `flag` (`--iface`: a name or `auto`) and `facts`. Pure.
pub fn choose(flag: &str, facts: &Facts) -> anyhow::Result<Choice> {
    if let Some(name) = facts.annotation.as_deref().filter(|n| !n.is_empty()) {
        return Ok(Choice {
            name: name.to_owned(),
            why: format!("the node's {IFACE_ANNOTATION} annotation"),
        });
    }
    if flag != AUTO {
        return Ok(Choice {
            name: flag.to_owned(),
            why: "--iface".to_owned(),
        });
    }
    for ip in &facts.node_ips {
        if let Some((_, _, name)) = facts.addresses.iter().find(|(a, _, _)| a == ip) {
            return Ok(Choice {
                name: name.clone(),
                why: format!("--iface auto: it carries the node's InternalIP {ip}"),
            });
        }
    }
    if let Some(name) = facts.default_routes.first() {
        return Ok(Choice {
            name: name.clone(),
            why: if facts.node_ips.is_empty() {
                "--iface auto: the node's InternalIP is unknown here; the default route's interface"
                    .to_owned()
            } else {
                format!(
                    "--iface auto: no interface carries the node's InternalIP ({}); the default route's interface",
                    list(&facts.node_ips)
                )
            },
        });
    }
    bail!(
        "--iface auto: no interface carries the node's InternalIP ({}) and there is no default route; \
         set --iface (the ConfigMap's iface) or annotate the node with {IFACE_ANNOTATION}=NAME",
        if facts.node_ips.is_empty() {
            "unknown".to_owned()
        } else {
            list(&facts.node_ips)
        }
    )
}

fn list(ips: &[IpAddr]) -> String {
    ips.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// [`Facts`] from the kernel (addresses, default routes) and what the Node says.
pub fn facts(annotation: Option<String>, node_ips: Vec<IpAddr>) -> anyhow::Result<Facts> {
    let addresses = rtnl::addresses(netlink_packet_route::AddressFamily::Unspec)
        .map_err(|e| anyhow!("reading this network namespace's addresses over netlink: {e}"))?;
    let mut named = Vec::new();
    for a in addresses {
        if let Some(ip) = a.local
            && let Ok(link) = rtnl::link_by_index(a.index)
            && let Some(name) = link.name
        {
            named.push((ip, a.index, name));
        }
    }
    let default_routes = [PROBE_V4, PROBE_V6]
        .into_iter()
        .filter_map(|probe| super::route_to(probe).ok())
        .map(|route| route.device)
        .collect();
    Ok(Facts {
        annotation,
        node_ips,
        addresses: named,
        default_routes,
    })
}

/// Chooses and opens the interface.
pub fn open(flag: &str, facts: &Facts) -> anyhow::Result<(Interface, Choice)> {
    let choice = choose(flag, facts)?;
    let iface =
        Interface::by_name(&choice.name).map_err(|e| anyhow!("{e} (chosen by {})", choice.why))?;
    Ok((iface, choice))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            annotation: None,
            node_ips: vec!["10.0.0.5".parse().unwrap()],
            addresses: vec![
                ("127.0.0.1".parse().unwrap(), 1, "lo".into()),
                ("10.0.0.5".parse().unwrap(), 3, "enp3s0".into()),
                ("192.168.9.1".parse().unwrap(), 4, "wg0".into()),
            ],
            default_routes: vec!["wg0".into()],
        }
    }

    #[test]
    fn the_annotation_then_the_flag_then_the_internal_ip_then_the_default_route() {
        let mut f = facts();
        assert_eq!(choose("auto", &f).unwrap().name, "enp3s0");
        assert!(
            choose("auto", &f)
                .unwrap()
                .why
                .contains("InternalIP 10.0.0.5")
        );
        assert_eq!(
            choose("eth0", &f).unwrap().name,
            "eth0",
            "a name is taken as given"
        );
        f.annotation = Some("bond0.42".into());
        for flag in ["auto", "eth0"] {
            let c = choose(flag, &f).unwrap();
            assert_eq!(
                c.name, "bond0.42",
                "the node's own say wins over --iface {flag}"
            );
            assert!(c.why.contains(IFACE_ANNOTATION));
        }
        f.annotation = None;
        f.node_ips = vec!["10.9.9.9".parse().unwrap()];
        let c = choose("auto", &f).unwrap();
        assert_eq!(c.name, "wg0");
        assert!(
            c.why
                .contains("no interface carries the node's InternalIP (10.9.9.9)"),
            "{}",
            c.why
        );
        f.default_routes.clear();
        let e = choose("auto", &f).unwrap_err().to_string();
        assert!(
            e.contains(IFACE_ANNOTATION) && e.contains("10.9.9.9"),
            "{e}"
        );
    }

    #[test]
    fn an_ipv6_internal_ip_picks_its_interface() {
        let mut f = facts();
        f.node_ips = vec!["fd00::5".parse().unwrap(), "10.9.9.9".parse().unwrap()];
        f.addresses
            .push(("fd00::5".parse().unwrap(), 5, "eno1".into()));
        assert_eq!(choose("auto", &f).unwrap().name, "eno1");
    }
}
