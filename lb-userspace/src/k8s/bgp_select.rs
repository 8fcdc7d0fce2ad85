//! Which VIP addresses this node announces over BGP (`bgp::Intent`), from the API objects and
//! the model built from them (pure, like `desired`); `bgp` itself knows no Kubernetes:
//!
//! - every VIP address of an `externalTrafficPolicy: Cluster` Service (every node balances it
//!   to every node);
//! - a `Local` Service's address only while this node has a ready endpoint of it (otherwise the
//!   node would take traffic the Service asked to keep on endpoint nodes);
//! - nothing, by draining, when the node is cordoned or labelled
//!   `node.kubernetes.io/exclude-from-external-load-balancers` (as MetalLB and cloud load
//!   balancers honour it), or is missing from the API.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use log::warn;

use super::desired::Built;
use super::pools::IPAddressPool;
use crate::bgp::{Intent, PoolAdvert};

pub use crate::node_state::EXCLUDE_LABEL;
use crate::node_state::operator_block;

/// What node `node_name` should announce given the objects and the model built from them.
pub fn intent(
    services: &[Arc<Service>],
    nodes: &[Arc<Node>],
    built: &Built,
    node_name: &str,
) -> Intent {
    let node = nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name));
    let drain = match node {
        None => Some(format!("node {node_name} is not in the API")),
        Some(n) => operator_block(n),
    };
    let me: Option<IpAddr> = built
        .node_names
        .iter()
        .find(|(_, name)| name.as_str() == node_name)
        .map(|(addr, _)| *addr);
    // The `Local` Services by `namespace/name`, looked up once per VIP (not a scan of every
    // Service per VIP: with 5,000 Services that was seconds on the agent's runtime).
    let local_services: BTreeSet<(&str, &str)> = services
        .iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local")
        })
        .map(|s| {
            (
                s.metadata.namespace.as_deref().unwrap_or(""),
                s.metadata.name.as_deref().unwrap_or(""),
            )
        })
        .collect();
    let mut addrs = BTreeSet::new();
    for vip in &built.desired.vips {
        let local = built
            .sources
            .get(&vip.key)
            .and_then(|source| source.service.split_once('/'))
            .is_some_and(|key| local_services.contains(&key));
        // While the node drains its backends drain too: its Local VIPs are then still sent
        // with graceful shutdown before the withdrawal, like the others.
        let serves = !local
            || vip
                .backends
                .iter()
                .any(|b| Some(b.addr) == me && (b.takes_new_flows() || drain.is_some()));
        if serves {
            addrs.insert(vip.key.addr);
        }
    }
    Intent {
        addrs,
        drain,
        adverts: BTreeMap::new(),
    }
}

/// The pools' BGP attributes (`IPAddressPool.spec.bgp`) of the addresses announced, followed
/// across rebuilds: a pool with unusable attributes is logged when that changes, and its
/// routes go out without them.
#[derive(Default)]
pub struct PoolAdverts {
    problems: BTreeSet<String>,
}

impl PoolAdverts {
    /// Each of `addrs` whose (valid) pool sets BGP attributes, with them.
    pub fn of(
        &mut self,
        pools: &[Arc<IPAddressPool>],
        built: &Built,
        addrs: &BTreeSet<IpAddr>,
    ) -> BTreeMap<IpAddr, PoolAdvert> {
        let mut problems = BTreeSet::new();
        let mut by_name = BTreeMap::new();
        for p in pools {
            let (Some(name), Some(bgp)) = (p.metadata.name.as_deref(), &p.spec.bgp) else {
                continue;
            };
            match bgp.advert() {
                Ok(a) => {
                    by_name.insert(name, a);
                }
                Err(e) => {
                    problems.insert(format!(
                        "IPAddressPool {name}: spec.bgp: {e}: its routes go out without them"
                    ));
                }
            }
        }
        if problems != self.problems {
            for line in problems.difference(&self.problems) {
                warn!("{line}");
            }
            self.problems = problems;
        }
        let Some(addressing) = &built.addressing else {
            return BTreeMap::new();
        };
        addrs
            .iter()
            .filter_map(|a| {
                let pool = addressing.pools.pool_of(*a)?;
                Some((*a, by_name.get(pool.spec.name.as_str())?.clone()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Settings;
    use serde_json::json;

    fn node(name: &str, ip: &str, labels: serde_json::Value, cordoned: bool) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "spec": {"unschedulable": cordoned},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": ip}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }))
            .unwrap(),
        )
    }

    fn service(name: &str, vip: &str, policy: &str) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"type": "LoadBalancer", "externalTrafficPolicy": policy,
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
                "status": {"loadBalancer": {"ingress": [{"ip": vip}]}},
            }))
            .unwrap(),
        )
    }

    fn slice(service: &str, node: &str) -> Arc<k8s_openapi::api::discovery::v1::EndpointSlice> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-1"), "namespace": "default",
                             "labels": {"kubernetes.io/service-name": service}},
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": node,
                               "conditions": {"ready": true}}],
            }))
            .unwrap(),
        )
    }

    fn pool(name: &str, cidr: &str, bgp: serde_json::Value) -> Arc<IPAddressPool> {
        let mut spec = json!({"addresses": [cidr]});
        if !bgp.is_null() {
            spec["bgp"] = bgp;
        }
        Arc::new(IPAddressPool::new(
            name,
            serde_json::from_value(spec).unwrap(),
        ))
    }

    /// An address carries its own pool's communities and LOCAL_PREF; a pool without them, or
    /// with unusable ones (logged), adds nothing.
    #[test]
    fn each_address_gets_its_pools_communities() {
        let pools = vec![
            pool(
                "gold",
                "203.0.113.0/28",
                json!({"communities": ["64512:100", "64512:200"], "localPref": 300}),
            ),
            pool("plain", "203.0.113.16/28", serde_json::Value::Null),
            pool(
                "typo",
                "203.0.113.32/28",
                json!({"communities": ["64512-1"]}),
            ),
        ];
        let policy = crate::k8s::desired::AddressPolicy {
            pools: pools
                .iter()
                .map(|p| crate::k8s::pools::pool_spec(p))
                .collect(),
            class: Default::default(),
        };
        let built = crate::k8s::build(&[], &[], &[], Settings::default(), &policy);
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        let addrs = BTreeSet::from([
            addr("203.0.113.1"),
            addr("203.0.113.17"),
            addr("203.0.113.33"),
        ]);
        let mut adverts = PoolAdverts::default();
        let got = adverts.of(&pools, &built, &addrs);
        assert_eq!(
            got,
            BTreeMap::from([(
                addr("203.0.113.1"),
                PoolAdvert {
                    communities: vec![(64512 << 16) | 100, (64512 << 16) | 200],
                    local_pref: Some(300),
                }
            )])
        );
        assert!(
            adverts.problems.iter().any(|p| p.contains("typo")),
            "{:?}",
            adverts.problems
        );
    }

    #[test]
    fn cluster_everywhere_local_only_with_endpoint_drain_on_label_and_cordon() {
        let services = vec![
            service("all", "203.0.113.1", "Cluster"),
            service("loc", "203.0.113.2", "Local"),
        ];
        let slices = vec![slice("loc", "n1")];
        let nodes = vec![
            node("n1", "192.0.2.11", json!({}), false),
            node("n2", "192.0.2.12", json!({}), false),
        ];
        let built = crate::k8s::build(
            &services,
            &slices,
            &nodes,
            Settings::default(),
            &Default::default(),
        );
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        let i1 = intent(&services, &nodes, &built, "n1");
        assert_eq!(
            i1.addrs,
            BTreeSet::from([addr("203.0.113.1"), addr("203.0.113.2")])
        );
        assert_eq!(i1.drain, None);
        let i2 = intent(&services, &nodes, &built, "n2");
        assert_eq!(i2.addrs, BTreeSet::from([addr("203.0.113.1")]));

        let labelled = vec![
            node("n1", "192.0.2.11", json!({EXCLUDE_LABEL: ""}), true),
            node("n2", "192.0.2.12", json!({}), true),
        ];
        let built = crate::k8s::build(
            &services,
            &slices,
            &labelled,
            Settings::default(),
            &Default::default(),
        );
        assert!(
            intent(&services, &labelled, &built, "n1")
                .drain
                .unwrap()
                .contains(EXCLUDE_LABEL)
        );
        let cordoned = intent(&services, &labelled, &built, "n2");
        assert!(cordoned.drain.unwrap().contains("cordoned"));
        // n1 (labelled and cordoned: its backends drain) keeps its Local VIP in the set, so
        // that it leaves gracefully with the rest.
        assert_eq!(
            intent(&services, &labelled, &built, "n1").addrs,
            BTreeSet::from([addr("203.0.113.1"), addr("203.0.113.2")])
        );
        assert!(intent(&services, &labelled, &built, "n9").drain.is_some());
    }
}
