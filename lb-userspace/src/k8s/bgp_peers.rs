//! The BGP routers as a Kubernetes resource (`BGPPeer.sluice.io`, cluster-scoped): a router
//! with a node selector (a rack's top-of-rack router peers with the rack's nodes), its own
//! settings (hold time, BFD, eBGP multihop, TTL security, source address, this side's AS) and
//! its TCP-MD5 password from a Secret in the agent's namespace. Each agent peers with the
//! BGPPeers whose selector matches its own Node's labels, besides `--bgp-peers`. The
//! CustomResourceDefinition in `deploy/` is generated from these types (a test compares).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::ListParams;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, CustomResource};
use log::{info, warn};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::agent::watch;
use super::crd_watch::{Absent, WhenInstalled, watch_when_installed};
use super::watch_metrics::WatchMetrics;
use crate::bgp::{Password, Peer, PeerOptions};

/// A Node label with this node's AS number: per-node AS for the BGPPeers that set no `myASN`.
pub const NODE_ASN_LABEL: &str = "sluice.io/bgp-asn";

/// A BGP router the selected nodes announce their VIPs to.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "sluice.io",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    shortname = "sluicepeer",
    printcolumn = r#"{"name":"Address","type":"string","jsonPath":".spec.peerAddress"}"#,
    printcolumn = r#"{"name":"ASN","type":"integer","jsonPath":".spec.peerASN"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct BGPPeerSpec {
    /// The router's address (IPv4 or IPv6).
    pub peer_address: String,
    /// The router's AS number.
    #[serde(rename = "peerASN")]
    pub peer_asn: u32,
    /// The router's TCP port [default: 179].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_port: Option<u16>,
    /// This side's AS number [default: the node's `sluice.io/bgp-asn` label, else the agent's
    /// `--bgp-asn`].
    #[serde(default, rename = "myASN", skip_serializing_if = "Option::is_none")]
    pub my_asn: Option<u32>,
    /// The address the nodes connect from [default: the kernel's choice]; an address every
    /// selected node has (so in practice a selector of one node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// eBGP multihop: the TTL of the session's packets (the router is this many hops away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebgp_multihop: Option<u8>,
    /// GTSM (RFC 5082, TTL security): send with TTL 255, accept only packets that came at
    /// most this many hops (1: directly connected). Excludes `ebgpMultihop`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security_hops: Option<u8>,
    /// Hold time proposed to the router, seconds (0, or 3 and more) [default: `--bgp-hold-time`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_time_seconds: Option<u16>,
    /// BFD with the router (the agent's `--bgp-bfd-interval` and `--bgp-bfd-multiplier`).
    #[serde(default)]
    pub bfd: bool,
    /// The TCP-MD5 password: a key of a Secret in the agent's namespace (sluice-system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// The nodes that peer with this router [default: all].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
}

/// A key of a Secret in the agent's namespace.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct SecretKeyRef {
    pub name: String,
    /// [default: `password`]
    #[serde(default = "default_password_key")]
    pub key: String,
}

fn default_password_key() -> String {
    "password".into()
}

/// Which Nodes, by their labels (a Kubernetes label selector: every term must hold).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<LabelRequirement>,
}

/// `key` `operator` (`In`, `NotIn`, `Exists`, `DoesNotExist`) `values`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct LabelRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

impl NodeSelector {
    /// Whether `labels` satisfy every term; an unknown operator matches nothing (a typo must
    /// not peer every node with a router).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let labels_hold = self
            .match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v));
        labels_hold
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }
}

/// The watched BGPPeers and the Secrets of the agent's namespace.
#[derive(Clone)]
pub struct PeerResources {
    pub peers: Store<BGPPeer>,
    /// `None` when this agent may not read them (only the bgp overlay grants it).
    pub secrets: Option<Store<Secret>>,
}

/// Watches the BGPPeers and the Secrets of `namespace` once the resource is installed (and
/// this agent may list it): until then only `--bgp-peers` are peers.
pub async fn watch_resources(
    client: &Client,
    namespace: &str,
    changed: Arc<Notify>,
    metrics: Option<WatchMetrics>,
) -> WhenInstalled<PeerResources> {
    let absent = Absent {
        meanwhile: "peering with --bgp-peers only",
        install: "apply deploy/base/06-crd-bgppeers.yaml for per-rack routers",
    };
    let namespace = namespace.to_owned();
    let on_change = changed.clone();
    watch_when_installed::<BGPPeer, _, _, _>(client, absent, changed, |client| async move {
        start_watches(client, &namespace, on_change, metrics).await
    })
    .await
}

/// The BGPPeers' watch, and the Secrets' when this agent may read them.
async fn start_watches(
    client: Client,
    namespace: &str,
    changed: Arc<Notify>,
    metrics: Option<WatchMetrics>,
) -> PeerResources {
    let peers = watch(
        Api::<BGPPeer>::all(client.clone()),
        watcher::Config::default(),
        changed.clone(),
        metrics.clone(),
    );
    let secrets_api = Api::<Secret>::namespaced(client, namespace);
    let secrets = match secrets_api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Some(watch(
            secrets_api,
            watcher::Config::default(),
            changed,
            metrics,
        )),
        Err(e) => {
            info!(
                "cannot read the Secrets of {namespace} ({e}): BGPPeers with a passwordSecretRef stay down (deploy/overlays/bgp grants reading them)"
            );
            None
        }
    };
    PeerResources { peers, secrets }
}

/// The peers of one BGPPeer for a node, or why it cannot be one.
fn peer_of(
    p: &BGPPeer,
    node_labels: &BTreeMap<String, String>,
    secrets: Option<&[Arc<Secret>]>,
) -> Result<Peer, String> {
    let spec = &p.spec;
    let addr: IpAddr = spec
        .peer_address
        .parse()
        .map_err(|_| format!("peerAddress {:?} is not an IP address", spec.peer_address))?;
    let source = match &spec.source_address {
        None => None,
        Some(s) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| format!("sourceAddress {s:?} is not an IP address"))?,
        ),
    };
    let node_asn =
        match node_labels.get(NODE_ASN_LABEL) {
            None => None,
            Some(v) => Some(v.parse::<u32>().map_err(|_| {
                format!("the node's label {NODE_ASN_LABEL}={v:?} is not an AS number")
            })?),
        };
    let password = match &spec.password_secret_ref {
        None => None,
        Some(r) => Some(secret_password(secrets, r)?),
    };
    let mut peer = Peer::new(addr, spec.peer_port.unwrap_or(179), spec.peer_asn);
    peer.options = PeerOptions {
        local_asn: spec.my_asn.or(node_asn),
        source,
        hold_time_secs: spec.hold_time_seconds,
        ebgp_multihop: spec.ebgp_multihop,
        ttl_security_hops: spec.ttl_security_hops,
        bfd: spec.bfd,
        password,
    };
    peer.check()?;
    Ok(peer)
}

fn secret_password(secrets: Option<&[Arc<Secret>]>, r: &SecretKeyRef) -> Result<Password, String> {
    let secrets = secrets.ok_or_else(|| {
        format!(
            "passwordSecretRef {:?}: this agent may not read the Secrets of its namespace (deploy/overlays/bgp grants it)",
            r.name
        )
    })?;
    let secret = secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(r.name.as_str()))
        .ok_or_else(|| {
            format!(
                "passwordSecretRef: no Secret {:?} in the agent's namespace",
                r.name
            )
        })?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(&r.key))
                .map(|s| s.clone().into_bytes())
        })
        .ok_or_else(|| {
            format!(
                "passwordSecretRef: Secret {:?} has no key {:?}",
                r.name, r.key
            )
        })?;
    let text = String::from_utf8(bytes).map_err(|_| {
        format!(
            "passwordSecretRef: Secret {:?} key {:?} is not UTF-8",
            r.name, r.key
        )
    })?;
    Password::new(&text).map_err(|e| format!("passwordSecretRef {:?}: {e}", r.name))
}

/// The BGPPeers of this node, followed across rebuilds: the problems (a bad address, a missing
/// Secret) are logged when they change, not on every rebuild.
#[derive(Default)]
pub struct PeerSelection {
    problems: BTreeSet<String>,
}

impl PeerSelection {
    /// The peers whose selector matches `node`'s labels, in the BGPPeers' name order; none
    /// while the node is not in the API (its labels are unknown).
    pub fn peers(
        &mut self,
        bgp_peers: &[Arc<BGPPeer>],
        node: Option<&Node>,
        secrets: Option<&[Arc<Secret>]>,
    ) -> Vec<Peer> {
        let empty = BTreeMap::new();
        let Some(labels) = node.map(|n| n.metadata.labels.as_ref().unwrap_or(&empty)) else {
            return Vec::new();
        };
        let mut sorted: Vec<&Arc<BGPPeer>> = bgp_peers.iter().collect();
        sorted.sort_by_key(|p| p.metadata.name.clone());
        let mut problems = BTreeSet::new();
        let mut out = Vec::new();
        for p in sorted {
            let selected = p
                .spec
                .node_selector
                .as_ref()
                .is_none_or(|s| s.matches(labels));
            if !selected {
                continue;
            }
            match peer_of(p, labels, secrets) {
                Ok(peer) => out.push(peer),
                Err(e) => {
                    problems.insert(format!(
                        "BGPPeer {}: {e}: no session",
                        p.metadata.name.as_deref().unwrap_or("")
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
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The CRD in deploy/ is what these types generate: the schema cannot drift.
    #[test]
    fn the_deployed_bgppeer_crd_is_the_generated_one() {
        crate::k8s::crd_watch::assert_deployed_crd_is_generated::<BGPPeer>(
            "06-crd-bgppeers.yaml",
            "bgp_peers.rs",
            "the_deployed_bgppeer_crd_is_the_generated_one",
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn selector(v: serde_json::Value) -> NodeSelector {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let rack_a = labels(&[("rack", "a"), ("zone", "z1")]);
        let rack_b = labels(&[("rack", "b")]);
        let none = labels(&[]);
        let s = selector(json!({"matchLabels": {"rack": "a"}}));
        assert!(s.matches(&rack_a) && !s.matches(&rack_b) && !s.matches(&none));
        let s = selector(
            json!({"matchExpressions": [{"key": "rack", "operator": "In", "values": ["a", "c"]}]}),
        );
        assert!(s.matches(&rack_a) && !s.matches(&rack_b) && !s.matches(&none));
        let s = selector(
            json!({"matchExpressions": [{"key": "rack", "operator": "NotIn", "values": ["a"]}]}),
        );
        assert!(!s.matches(&rack_a) && s.matches(&rack_b) && s.matches(&none));
        let s = selector(json!({"matchExpressions": [{"key": "zone", "operator": "Exists"}]}));
        assert!(s.matches(&rack_a) && !s.matches(&rack_b));
        let s =
            selector(json!({"matchExpressions": [{"key": "zone", "operator": "DoesNotExist"}]}));
        assert!(!s.matches(&rack_a) && s.matches(&rack_b));
        // Every term must hold.
        let s = selector(json!({"matchLabels": {"rack": "a"},
            "matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]}));
        assert!(!s.matches(&rack_a));
        // An unknown operator matches nothing; the empty selector everything.
        let s = selector(
            json!({"matchExpressions": [{"key": "rack", "operator": "in", "values": ["a"]}]}),
        );
        assert!(!s.matches(&rack_a));
        assert!(NodeSelector::default().matches(&rack_b));
    }

    fn bgp_peer(name: &str, spec: serde_json::Value) -> Arc<BGPPeer> {
        Arc::new(BGPPeer::new(name, serde_json::from_value(spec).unwrap()))
    }

    fn node(labels: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n1", "labels": labels}})).unwrap()
    }

    fn secret(name: &str, key: &str, value: &str) -> Arc<Secret> {
        let mut secret = Secret::default();
        secret.metadata.name = Some(name.to_owned());
        secret.data = Some(BTreeMap::from([(
            key.to_owned(),
            k8s_openapi::ByteString(value.as_bytes().to_vec()),
        )]));
        Arc::new(secret)
    }

    /// A node peers with the routers whose selector matches its labels, with their settings,
    /// the password from the Secret and its per-node AS; a broken BGPPeer is skipped.
    #[test]
    fn a_node_gets_its_racks_peers_with_settings_and_password() {
        let peers = vec![
            bgp_peer(
                "rack-a",
                json!({"peerAddress": "192.0.2.1", "peerASN": 65001, "holdTimeSeconds": 9,
                       "bfd": true, "ttlSecurityHops": 1,
                       "passwordSecretRef": {"name": "bgp-auth"},
                       "nodeSelector": {"matchLabels": {"rack": "a"}}}),
            ),
            bgp_peer(
                "rack-b",
                json!({"peerAddress": "192.0.2.2", "peerASN": 65002, "myASN": 64999,
                       "nodeSelector": {"matchLabels": {"rack": "b"}}}),
            ),
            bgp_peer(
                "everyone",
                json!({"peerAddress": "2001:db8::1", "peerASN": 65003, "peerPort": 1179}),
            ),
            bgp_peer(
                "broken",
                json!({"peerAddress": "not-an-ip", "peerASN": 65004}),
            ),
        ];
        let secrets = vec![secret("bgp-auth", "password", "s3cret")];
        let mut selection = PeerSelection::default();
        let a = node(json!({"rack": "a", NODE_ASN_LABEL: "64601"}));
        let got = selection.peers(&peers, Some(&a), Some(&secrets));
        let addrs: Vec<String> = got.iter().map(|p| p.addr.to_string()).collect();
        assert_eq!(addrs, ["2001:db8::1", "192.0.2.1"]);
        let rack_a = &got[1];
        assert_eq!(rack_a.asn, 65001);
        assert_eq!(rack_a.options.local_asn, Some(64601));
        assert_eq!(rack_a.options.hold_time_secs, Some(9));
        assert_eq!(rack_a.options.ttl_security_hops, Some(1));
        assert!(rack_a.options.bfd);
        assert_eq!(
            rack_a.options.password.as_ref().map(|p| p.bytes().to_vec()),
            Some(b"s3cret".to_vec())
        );
        assert_eq!(got[0].port, 1179);
        assert_eq!(selection.problems.len(), 1, "{:?}", selection.problems);

        let b = node(json!({"rack": "b", NODE_ASN_LABEL: "64602"}));
        let got = selection.peers(&peers, Some(&b), Some(&secrets));
        let rack_b = got.iter().find(|p| p.asn == 65002).unwrap();
        // myASN wins over the node's label.
        assert_eq!(rack_b.options.local_asn, Some(64999));
        assert!(!got.iter().any(|p| p.asn == 65001));
        // No Node: no labels known, no peers.
        assert!(selection.peers(&peers, None, Some(&secrets)).is_empty());
        // Without its Secret the rack's peer is skipped (a session without the password
        // would only fail at the router).
        let got = selection.peers(&peers, Some(&a), Some(&[]));
        assert!(!got.iter().any(|p| p.asn == 65001));
        assert!(selection.problems.iter().any(|p| p.contains("bgp-auth")));
        // Without the right to read Secrets (no bgp overlay): skipped too, and it says why.
        let got = selection.peers(&peers, Some(&a), None);
        assert!(!got.iter().any(|p| p.asn == 65001));
        assert!(
            selection
                .problems
                .iter()
                .any(|p| p.contains("may not read the Secrets"))
        );
    }
}
