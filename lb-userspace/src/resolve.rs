//! Desired -> where each backend is: the one step of a reconcile that asks the kernel
//! (addresses, neighbours, routes). Planning is a pure function of its result, so every
//! ordering rule of the apply is testable without root. One timeout and one policy serve the
//! file and the Kubernetes source alike.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::anyhow;

use crate::{
    model::{Desired, FlowState, ForwardingMode, MacAddr},
    net::{self, Interface},
};

/// How long one unknown neighbour may take to answer ARP/ND in one pass.
pub const NEIGHBOUR_TIMEOUT: Duration = Duration::from_millis(500);

/// Where a backend is, as the kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// One of this node's own addresses: its packets go to this node's stack.
    Local,
    /// Reached through `egress` at `mac` (the backend's own in L2 mode, the next hop's in ipip
    /// mode); `source` is the address the kernel would send from (the default outer source).
    Remote {
        mac: MacAddr,
        egress: Interface,
        source: Option<IpAddr>,
    },
}

/// What resolving a desired state found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub targets: HashMap<(IpAddr, ForwardingMode), Target>,
    /// Backends that could not be resolved now, with why (a node that is down does not answer
    /// ARP). The plan keeps such a backend on its last known MAC, draining, or leaves it out.
    pub failures: BTreeMap<(IpAddr, ForwardingMode), String>,
    /// This node's addresses (the inline decapsulator unwraps what is sent to them).
    pub local: BTreeSet<IpAddr>,
    /// MACs of the other sluice nodes (`Desired::peers`) on the attached segment.
    pub peer_macs: BTreeSet<MacAddr>,
    /// Whether this node's conntrack tracks its connections (`None`: not asked).
    pub conntrack_tracks: Option<bool>,
}

impl Resolved {
    /// The mode this node runs: `desired`'s, with `auto` decided by its conntrack and its
    /// VIPs' forwarding.
    pub fn flow_state(&self, desired: &Desired) -> FlowState {
        desired
            .settings
            .flow_state
            .effective(self.conntrack_tracks, desired.encapsulates())
    }

    /// Addresses of the backends that could not be resolved.
    pub fn unresolved(&self) -> BTreeSet<IpAddr> {
        self.failures.keys().map(|(addr, _)| *addr).collect()
    }
}

/// What earlier passes found, each with when: reused until the periodic refresh forgets it all
/// (every [`net::NEXT_HOP_MAX_AGE`]; `reconcile::Carry::renew`), and never beyond
/// [`net::NEXT_HOP_REFRESH`], so that an apply asks the kernel only about backends and peers
/// it has not found recently (at 1,000 nodes every EndpointSlice change would otherwise be
/// 1,000 route and neighbour lookups; the refresh pass pays for them, not a change).
/// What did not answer is never kept: it is asked again at every pass.
#[derive(Debug, Default)]
pub struct Found {
    targets: HashMap<(IpAddr, ForwardingMode), (Target, Instant)>,
    /// A peer's MAC, or `None` for one behind a router (it never sends with its own MAC).
    peers: HashMap<IpAddr, (Option<MacAddr>, Instant)>,
    /// What the conntrack probe answered (`dataplane::conntrack_tracks`), asked by the
    /// reconcile driver, which holds the program: again after each refresh.
    pub conntrack_tracks: Option<bool>,
}

impl Found {
    fn forget_old(&mut self) {
        self.targets
            .retain(|_, (_, at)| at.elapsed() < net::NEXT_HOP_REFRESH);
        self.peers
            .retain(|_, (_, at)| at.elapsed() < net::NEXT_HOP_REFRESH);
    }
}

/// Resolves every backend and peer of `desired` as seen from `iface`, reusing what `found`
/// holds from earlier passes and adding what this one finds.
pub fn resolve_with(
    iface: &Interface,
    desired: &Desired,
    found: &mut Found,
) -> anyhow::Result<Resolved> {
    found.forget_old();
    let local: BTreeSet<IpAddr> = net::local_addresses()?.into_iter().collect();
    let mut out = Resolved {
        local,
        conntrack_tracks: found.conntrack_tracks,
        ..Resolved::default()
    };
    let mut egress_by_name: HashMap<String, Interface> = HashMap::new();
    egress_by_name.insert(iface.name.clone(), iface.clone());
    let mut addresses_by_name: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (list, mode) in desired.distinct_backend_lists() {
        for backend in list {
            let key = (backend.addr, mode);
            if out.targets.contains_key(&key) || out.failures.contains_key(&key) {
                continue;
            }
            if out.local.contains(&backend.addr) {
                out.targets.insert(key, Target::Local);
                continue;
            }
            if let Some((target, _)) = found.targets.get(&key) {
                out.targets.insert(key, target.clone());
                continue;
            }
            let looked_up = match (backend.mac, mode) {
                // A configured MAC is on the attached interface's segment (in ipip mode: the
                // next hop's).
                (Some(mac), mode) => Ok((mac, iface.clone(), None, mode)),
                (None, ForwardingMode::L2) => net::resolve_neighbour(backend.addr, NEIGHBOUR_TIMEOUT)
                    .map_err(|e| {
                        format!(
                            "cannot find its MAC address: {e}; set `mac:` for it in the config or check that it is on a directly connected network (or use mode ipip)"
                        )
                    })
                    .and_then(|n| {
                        let egress = interface(&mut egress_by_name, &n.device)?;
                        Ok((n.mac, egress, None, ForwardingMode::L2))
                    }),
                (None, ForwardingMode::Ipip) => net::resolve_next_hop(backend.addr, NEIGHBOUR_TIMEOUT)
                    .map_err(|e| {
                        format!(
                            "cannot find the next hop towards it: {e}; check the routes (`ip route get {}`)",
                            backend.addr
                        )
                    })
                    .and_then(|(route, hop)| {
                        let egress = interface(&mut egress_by_name, &route.device)?;
                        Ok((hop.mac, egress, route.source, ForwardingMode::Ipip))
                    }),
            };
            match looked_up {
                Ok((mac, egress, mut source, mode)) => {
                    if mode == ForwardingMode::Ipip && source.is_none() {
                        // The outer source defaults to the egress interface's own address
                        // (asked once per interface, not once per backend).
                        let own = match addresses_by_name.get(&egress.name) {
                            Some(own) => own,
                            None => {
                                let own = egress
                                    .addresses()
                                    .map_err(|e| anyhow!("backend {}: {e}", backend.addr))?;
                                addresses_by_name.entry(egress.name.clone()).or_insert(own)
                            }
                        };
                        source = own
                            .iter()
                            .copied()
                            .find(|a| a.is_ipv4() == backend.addr.is_ipv4());
                    }
                    let parent = (egress.index != iface.index)
                        .then(|| net::vlan_parent(&egress.name))
                        .flatten();
                    let target = Target::Remote {
                        mac,
                        egress: through_parent(iface, egress, parent),
                        source,
                    };
                    found.targets.insert(key, (target.clone(), Instant::now()));
                    out.targets.insert(key, target);
                }
                Err(why) => {
                    out.failures.insert(key, why);
                }
            }
        }
    }
    for peer in &desired.peers {
        if out.local.contains(peer) {
            continue;
        }
        let key = (*peer, ForwardingMode::L2);
        let mac = match out.targets.get(&key) {
            Some(Target::Remote { mac, .. }) => Some(*mac),
            // Asked already in this pass, as a backend, and it did not answer.
            _ if out.failures.contains_key(&key) => None,
            _ => match found.peers.get(peer) {
                Some((mac, _)) => *mac,
                // Only a peer on a directly connected network sends frames with its own MAC;
                // one behind a router is never waited for.
                None if net::route_to(*peer).is_ok_and(|r| r.gateway.is_none()) => {
                    let mac = net::resolve_neighbour(*peer, NEIGHBOUR_TIMEOUT)
                        .ok()
                        .map(|n| n.mac);
                    if mac.is_some() {
                        found.peers.insert(*peer, (mac, Instant::now()));
                    }
                    mac
                }
                None => {
                    found.peers.insert(*peer, (None, Instant::now()));
                    None
                }
            },
        };
        // A peer that does not answer sends nothing either; it is added once it does.
        out.peer_macs.extend(mac);
    }
    Ok(out)
}

/// The interface a next hop found on `egress` is reached through: `attached` itself when
/// `egress` is a VLAN device on it (`vlan_parent`: its parent's index). The program sees that
/// VLAN's frames on the parent with their 802.1Q tag and sends them back out with it; a
/// redirect to the VLAN device would be dropped (it has no XDP transmit).
fn through_parent(attached: &Interface, egress: Interface, vlan_parent: Option<u32>) -> Interface {
    if vlan_parent == Some(attached.index) {
        attached.clone()
    } else {
        egress
    }
}

/// The interface named `name`, read once per resolve.
fn interface(known: &mut HashMap<String, Interface>, name: &str) -> Result<Interface, String> {
    if let Some(found) = known.get(name) {
        return Ok(found.clone());
    }
    let found = Interface::by_name(name).map_err(|e| e.to_string())?;
    known.insert(name.to_owned(), found.clone());
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(name: &str, index: u32) -> Interface {
        Interface {
            name: name.into(),
            index,
            mac: MacAddr([2, 0, 0, 0, 0, index as u8]),
            mtu: 1500,
        }
    }

    #[test]
    fn a_next_hop_on_a_vlan_of_the_attached_interface_is_reached_through_it() {
        let eth0 = link("eth0", 2);
        // eth0.100 on eth0: sent back out of eth0, the frame's tag kept.
        assert_eq!(
            through_parent(&eth0, link("eth0.100", 7), Some(2)).name,
            "eth0"
        );
        // A VLAN on another interface, and any other device: their own (a TX port).
        assert_eq!(
            through_parent(&eth0, link("eth1.100", 8), Some(3)).name,
            "eth1.100"
        );
        assert_eq!(through_parent(&eth0, link("eth1", 3), None).name, "eth1");
    }
}
