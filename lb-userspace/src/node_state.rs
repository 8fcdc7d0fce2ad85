//! What a Node object says about taking VIP traffic, read the same way by the model (which
//! nodes take new flows), the health ring (which nodes are probed), the BGP selection and the L2
//! announcer (which nodes may attract it).

use k8s_openapi::api::core::v1::Node;

/// Nodes with this label are left out of external load balancing (the Kubernetes convention,
/// honoured by cloud load balancers and MetalLB): no new flows, no announcement.
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The kubelet reports the node Ready.
pub fn is_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// `kubectl cordon` (spec.unschedulable).
pub fn is_cordoned(node: &Node) -> bool {
    node.spec
        .as_ref()
        .and_then(|s| s.unschedulable)
        .unwrap_or(false)
}

/// Labelled [`EXCLUDE_LABEL`] (any value).
pub fn is_excluded(node: &Node) -> bool {
    node.metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(EXCLUDE_LABEL))
}

/// Why the node's operator keeps it out of VIP traffic (labelled excluded, or cordoned),
/// `None` when they do not: what BGP withdraws for.
pub fn operator_block(node: &Node) -> Option<String> {
    let name = node.metadata.name.as_deref().unwrap_or("");
    if is_excluded(node) {
        Some(format!("node {name} is labelled {EXCLUDE_LABEL}"))
    } else if is_cordoned(node) {
        Some(format!("node {name} is cordoned"))
    } else {
        None
    }
}

/// Why the node must not attract VIP traffic by announcing ([`operator_block`], or NotReady),
/// `None` when it may.
pub fn announce_block(node: &Node) -> Option<String> {
    operator_block(node).or_else(|| {
        (!is_ready(node)).then(|| {
            let name = node.metadata.name.as_deref().unwrap_or("");
            format!("node {name} is not Ready")
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(labels: serde_json::Value, cordoned: bool, ready: bool) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n0", "labels": labels},
            "spec": {"unschedulable": cordoned},
            "status": {"conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
        }))
        .expect("a Node")
    }

    #[test]
    fn a_node_announces_only_when_ready_schedulable_and_not_excluded() {
        assert_eq!(
            announce_block(&node(serde_json::json!({}), false, true)),
            None
        );
        let excluded = announce_block(&node(serde_json::json!({EXCLUDE_LABEL: ""}), false, true));
        assert!(excluded.is_some_and(|r| r.contains(EXCLUDE_LABEL)));
        let cordoned = announce_block(&node(serde_json::json!({}), true, true));
        assert!(cordoned.is_some_and(|r| r.contains("cordoned")));
        let not_ready = announce_block(&node(serde_json::json!({}), false, false));
        assert!(not_ready.is_some_and(|r| r.contains("not Ready")));
    }
}
