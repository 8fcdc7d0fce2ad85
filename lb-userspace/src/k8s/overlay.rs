//! Health and load laid over the model the agent built from the API: `health` checks and
//! weighs, this module says which of the Kubernetes model's parts they act on (the Services'
//! per-VIP opt-outs, the nodes' names, the Leases read from the API).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::desired::Built;
use crate::health::votes::{SharedDrained, shared_verdict};
use crate::health::{AgentHealth, load, overlay, probe, targets};

/// The agent's overlay of one freshly built model: this node probes its share of the nodes
/// (itself and its successors on the health ring, `me`; every backend that is no node), the
/// nodes down for a quorum of their watchers (`votes`, counted from the Leases) drain, the
/// Leases' multipliers apply (per Service opt-out), and the rows go to `/metrics` and
/// `inspect backends`. Without `votes` (no Lease watch) each probed backend's own verdict
/// applies.
pub fn agent_overlay(
    built: &mut Built,
    prober: &probe::Prober,
    leases: Option<&[Arc<k8s_openapi::api::coordination::v1::Lease>]>,
    clock: &load::LeaseClock,
    config: &AgentHealth,
    me: Option<&str>,
    votes: Option<&SharedDrained>,
) {
    let Built {
        desired,
        sources,
        node_names,
        ..
    } = built;
    if !config.checks {
        for vip in &mut desired.vips {
            vip.health_check = None;
        }
    }
    let shared = votes.map(SharedDrained::get);
    // Each Service probes on its own share: one Service's silent ports stall none of the others.
    let probed = targets(
        desired,
        &|vip| {
            sources
                .get(&vip.key)
                .map_or_else(|| vip.key.to_string().into(), |s| s.service.clone())
        },
        // A node is probed by its watchers only (the others read their votes).
        &|addr, _| match &shared {
            Some((ring, _)) => node_names
                .get(&addr)
                .is_none_or(|node| me.is_some_and(|me| ring.watches(me, node))),
            None => true,
        },
    );
    prober.set_targets(&probed);
    let loads = match leases {
        Some(l) if config.load_aware => {
            // Leases count only for the cluster's Nodes (problems are logged by `load::follow`).
            let nodes: BTreeSet<String> = node_names.values().cloned().collect();
            load::node_loads(
                l,
                &nodes,
                clock,
                k8s_openapi::jiff::Timestamp::now(),
                std::time::Instant::now(),
            )
            .loads
        }
        _ => BTreeMap::new(),
    };
    if let Some(m) = &config.metrics {
        m.set_nodes(loads.iter().map(|(n, l)| (n.clone(), l.clone())).collect());
    }
    let groups = overlay(
        desired,
        node_names,
        &|addr, check| {
            let own = || {
                probed
                    .contains_key(&(addr, check.clone()))
                    .then(|| prober.verdict(addr, check))
            };
            match (node_names.get(&addr), &shared) {
                (Some(node), Some((ring, drained))) => {
                    shared_verdict(node, check, ring, drained, own())
                }
                _ => prober.verdict(addr, check),
            }
        },
        // Without any load a VIP's opt-out changes nothing: not looked up per VIP.
        &|vip| !loads.is_empty() && sources.get(vip).is_none_or(|s| s.options.load_aware),
        &|addr| node_names.get(&addr).and_then(|n| loads.get(n)).cloned(),
    );
    if let Some(m) = &config.metrics {
        m.board.set(groups);
    }
}

#[cfg(test)]
mod tests {
    //! Issue 30 item 6: `--health-checks=false`, `--load-aware=false`, the per-Service
    //! load-aware opt-out and stale peer Leases, through the agent's own overlay of a model
    //! built from API objects and Leases as the API server would give them.

    use std::time::{Duration, Instant};

    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::{Node, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use serde_json::{Value, json};

    use super::*;
    use crate::health::votes::{self, DOWN_ANNOTATION};
    use crate::k8s::desired::{self, AddressPolicy};
    use crate::model::Settings;

    fn node(i: usize) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("n{i}")},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": format!("10.0.{}.{}", i / 250, i % 250 + 1)}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }))
            .unwrap(),
        )
    }

    /// Service `name` (Cluster policy, port 80, ingress `vip`) with `annotations`, and its slice
    /// (one ready endpoint on n0).
    fn service(name: &str, vip: &str, annotations: Value) -> (Arc<Service>, Arc<EndpointSlice>) {
        let svc = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "annotations": annotations},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Cluster",
                     "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
            "status": {"loadBalancer": {"ingress": [{"ip": vip}]}},
        }))
        .unwrap();
        let slice = serde_json::from_value(json!({
            "metadata": {"name": format!("{name}-x"), "namespace": "default",
                         "labels": {desired::SERVICE_NAME_LABEL: name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.0.5"], "nodeName": "n0",
                           "conditions": {"ready": true, "serving": true, "terminating": false}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
        (Arc::new(svc), Arc::new(slice))
    }

    /// Node `n`'s Lease, renewed `age` ago by its own word, with `annotations`.
    fn lease(n: &str, age: Duration, annotations: Value) -> Arc<Lease> {
        let renew = Timestamp::now() - SignedDuration::try_from(age).unwrap();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": load::lease_name(n), "resourceVersion": "1",
                             "annotations": annotations},
                "spec": {"renewTime": MicroTime(renew)},
            }))
            .unwrap(),
        )
    }

    fn loaded(multiplier: u32) -> Value {
        json!({load::LOAD_ANNOTATION: "0.9", load::MULTIPLIER_ANNOTATION: multiplier.to_string()})
    }

    fn config(checks: bool, load_aware: bool) -> AgentHealth {
        AgentHealth {
            checks,
            load_aware,
            load: None,
            namespace: "sluice-system".into(),
            follow_every: Duration::from_secs(2),
            metrics: None,
        }
    }

    /// A prober whose probes never run (its runtime is never driven): only its targets count.
    fn idle_prober() -> (tokio::runtime::Runtime, probe::Prober) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let prober = probe::Prober::new(rt.handle().clone(), Default::default(), None);
        (rt, prober)
    }

    /// (node name, weight, drain) of `vip`'s backends.
    fn weights(b: &Built, vip: &str) -> Vec<(String, u32, bool)> {
        let vip = b
            .desired
            .vips
            .iter()
            .find(|v| v.key.to_string() == vip)
            .unwrap_or_else(|| panic!("no {vip}"));
        vip.backends
            .iter()
            .map(|be| (b.node_names[&be.addr].clone(), be.weight, be.drain))
            .collect()
    }

    const SHAPED: &str = "10.9.0.1:80/tcp";
    const OPTED_OUT: &str = "10.9.0.2:80/tcp";

    fn built(nodes: &[Arc<Node>]) -> Built {
        let (a, sa) = service("shaped", "10.9.0.1", json!({}));
        let (b, sb) = service(
            "opted-out",
            "10.9.0.2",
            json!({crate::k8s::options::LOAD_AWARE_ANNOTATION: "false"}),
        );
        desired::build(
            &[a, b],
            &[sa, sb],
            nodes,
            Settings::default(),
            &AddressPolicy::default(),
        )
    }

    /// [`built`] with the overlay as node `me` lays it (the Leases read now).
    fn overlaid(
        nodes: &[Arc<Node>],
        prober: &probe::Prober,
        leases: &[Arc<Lease>],
        config: &AgentHealth,
        me: &str,
        votes: Option<&SharedDrained>,
    ) -> Built {
        let mut b = built(nodes);
        let clock = load::LeaseClock::default();
        agent_overlay(
            &mut b,
            prober,
            Some(leases),
            &clock,
            config,
            Some(me),
            votes,
        );
        b
    }

    #[test]
    fn load_multipliers_the_opt_out_the_flag_and_stale_leases() {
        let nodes: Vec<Arc<Node>> = (0..3).map(node).collect();
        // n1 publishes 10 %, fresh; n2 published 10 % a minute ago (stale: neutral).
        let leases = [
            lease("n1", Duration::from_secs(1), loaded(10)),
            lease("n2", Duration::from_secs(60), loaded(10)),
        ];
        let (_rt, prober) = idle_prober();
        let run = |load_aware: bool| {
            overlaid(
                &nodes,
                &prober,
                &leases,
                &config(true, load_aware),
                "n0",
                None,
            )
        };
        let on = run(true);
        let w = |n: &str, weight: u32| (n.to_owned(), weight, false);
        // n1 at a tenth of n0; n2's stale Lease counts as neutral.
        assert_eq!(weights(&on, SHAPED), [w("n0", 10), w("n1", 1), w("n2", 10)]);
        // The Service that opted out keeps its base weights.
        let base = weights(&run(false), SHAPED);
        assert!(
            base.iter().all(|(_, weight, _)| *weight == base[0].1),
            "{base:?}"
        );
        assert_eq!(weights(&on, OPTED_OUT), base);
        // --load-aware=false: no multiplier applies anywhere.
        assert_eq!(weights(&run(false), OPTED_OUT), base);
    }

    #[test]
    fn votes_drain_for_everyone_and_health_checks_off_drains_nothing() {
        let nodes: Vec<Arc<Node>> = (0..3).map(node).collect();
        let check = "http:10256/healthz";
        let down = json!({DOWN_ANNOTATION: format!("{{\"n2\": [\"{check}\"]}}")});
        let leases = [
            lease("n0", Duration::from_secs(1), down.clone()),
            lease("n1", Duration::from_secs(1), down),
        ];
        let ring = votes::ready_ring(&nodes);
        let counted = votes::tally(
            &ring,
            &votes::ballots(
                &leases,
                &ring,
                &load::LeaseClock::default(),
                Timestamp::now(),
                Instant::now(),
            ),
        );
        let shared = votes::SharedDrained::default();
        shared.set(ring, counted);
        let (_rt, prober) = idle_prober();
        let run = |checks: bool| {
            overlaid(
                &nodes,
                &prober,
                &leases,
                &config(checks, false),
                "n0",
                Some(&shared),
            )
        };
        let drains =
            |b: &Built| -> Vec<bool> { weights(b, SHAPED).iter().map(|(_, _, d)| *d).collect() };
        // Two of n2's watchers say its kube-proxy check fails: drained, on every node alike
        // (this one probes it too: three nodes probe everyone).
        assert_eq!(drains(&run(true)), [false, false, true]);
        assert_eq!(prober.targets().len(), 3, "{:?}", prober.targets());
        // --health-checks=false: nothing probed, nothing drained by vote.
        assert_eq!(drains(&run(false)), [false, false, false]);
        assert!(prober.targets().is_empty(), "{:?}", prober.targets());
    }

    #[test]
    fn a_node_probes_only_its_share_of_a_large_cluster() {
        let nodes: Vec<Arc<Node>> = (0..50).map(node).collect();
        let ring = votes::ready_ring(&nodes);
        let shared = votes::SharedDrained::default();
        shared.set(ring.clone(), votes::Drained::new());
        let (_rt, prober) = idle_prober();
        let b = overlaid(
            &nodes,
            &prober,
            &[],
            &config(true, false),
            "n7",
            Some(&shared),
        );
        let probed: BTreeSet<String> = prober
            .targets()
            .iter()
            .map(|(addr, _)| b.node_names[addr].clone())
            .collect();
        let want: BTreeSet<String> = ring
            .watched_by("n7")
            .iter()
            .map(|n| (*n).to_owned())
            .collect();
        assert_eq!(probed, want);
        assert_eq!(probed.len(), crate::health::ring::SUCCESSORS + 1);
        // Nobody says down: every backend up, none drained.
        assert!(weights(&b, SHAPED).iter().all(|(_, _, d)| !d));
    }
}
