//! What a Service and a Node ask of sluice beyond addresses and ports: the forwarding mode, client
//! affinity, source ranges (Service) and a weight (Node). Parsed and validated here, so that a typo
//! is reported with the object's name instead of silently changing how traffic is forwarded.

use k8s_openapi::api::core::v1::{Node, Service};

use crate::model::{
    CheckProtocol, DEFAULT_WEIGHT, HealthCheck, KUBE_PROXY_HEALTHZ_PORT, MAX_WEIGHT, parse_duration,
};
pub use crate::model::{ForwardingMode, IpNet};

/// Service annotation choosing how packets reach the nodes: `l2` (MAC rewrite, nodes on the load
/// balancer's L2 segment) or `ipip` (encapsulation, nodes anywhere).
pub const FORWARDING_MODE_ANNOTATION: &str = "sluice.io/forwarding-mode";
/// Node annotation scaling the node's share of new flows (0 to 10000, default 1; 0 takes none;
/// at most [`MAX_WEIGHT_OVER_MEDIAN`] times the median node weight counts).
pub const WEIGHT_ANNOTATION: &str = "sluice.io/weight";
/// The most a node's weight may be, in multiples of the median weight of the nodes (of those
/// with a positive weight). A node's own credentials can write its Node's annotations (the
/// kubelet may annotate its own Node), so `sluice.io/weight` is trusted only up to this factor:
/// 8 covers real hardware spreads (an 8-core node beside a 64-core one) while one node can take
/// at most 8/(8+n-1) of the new flows among n otherwise equal nodes, and never more than 16 times
/// the mean share (at least half the positive weights are >= the median).
pub const MAX_WEIGHT_OVER_MEDIAN: u32 = 8;
/// Service annotation overriding the health check of its nodes: `off`, `tcp:PORT` or
/// `http:PORT/PATH` (then optionally `interval=1s timeout=500ms fall=3 rise=2`).
pub const HEALTH_CHECK_ANNOTATION: &str = "sluice.io/health-check";
/// Service annotation `"false"`: the nodes' load does not shape this Service's weights.
pub const LOAD_AWARE_ANNOTATION: &str = "sluice.io/load-aware";
/// Kubernetes' upper bound for `sessionAffinityConfig.clientIP.timeoutSeconds` (one day).
const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86_400;

/// A Service's choices that apply to every VIP it produces.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct VipOptions {
    pub mode: ForwardingMode,
    /// `spec.sessionAffinity: ClientIP`. Its timeout is validated but has nothing to act on:
    /// sluice's affinity is by hash, as sticky as the backend set is stable.
    pub client_affinity: bool,
    /// `spec.loadBalancerSourceRanges`, of both families; empty admits every client. A VIP
    /// admits only the clients they list: ranges of the other family admit none of its
    /// clients (an IPv4 VIP of a Service that lists only IPv6 ranges admits nobody), as
    /// kube-proxy does.
    pub source_ranges: Vec<IpNet>,
    /// How its nodes are checked: kube-proxy's conventions unless annotated (`None`: off).
    pub health_check: Option<HealthCheck>,
    /// Whether the nodes' published load multipliers apply (`sluice.io/load-aware: "false"`).
    pub load_aware: bool,
}

/// The `sluice.io/health-check` annotation: `off`, or `tcp:PORT` / `http:PORT[/PATH]`, then
/// optionally `interval=1s timeout=500ms fall=3 rise=2` separated by spaces. `None`: off.
pub fn parse_annotation(text: &str) -> Result<Option<HealthCheck>, String> {
    let mut words = text.split_whitespace();
    let Some(first) = words.next() else {
        return Err("empty: write off, tcp:PORT or http:PORT/PATH".into());
    };
    if first.eq_ignore_ascii_case("off") {
        return match words.next() {
            None => Ok(None),
            Some(w) => Err(format!("{w:?} after off")),
        };
    }
    let hint = "write off, tcp:PORT or http:PORT/PATH, then optionally interval=1s timeout=500ms fall=3 rise=2";
    let (protocol, rest) = first
        .split_once(':')
        .ok_or_else(|| format!("{first:?}: {hint}"))?;
    let protocol = match protocol.to_ascii_lowercase().as_str() {
        "tcp" => CheckProtocol::Tcp,
        "http" => CheckProtocol::Http,
        _ => return Err(format!("{first:?}: {hint}")),
    };
    let (port, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    if protocol == CheckProtocol::Tcp && path != "/" {
        return Err(format!("{first:?}: a tcp check has no path"));
    }
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{first:?}: port {port:?} is not 1-65535"))?;
    let mut check = HealthCheck::new(protocol, port, path);
    for word in words {
        let (key, value) = word
            .split_once('=')
            .ok_or_else(|| format!("{word:?}: {hint}"))?;
        let count = || {
            value
                .parse::<u32>()
                .map_err(|_| format!("{key}={value:?} is not a whole number"))
        };
        match key {
            "interval" => check.interval = parse_duration(value)?,
            "timeout" => check.timeout = parse_duration(value)?,
            "fall" => check.fall = count()?,
            "rise" => check.rise = count()?,
            _ => return Err(format!("{word:?}: unknown key {key:?}; {hint}")),
        }
    }
    check.validate()?;
    Ok(Some(check))
}

/// The health check of a Service: the annotation, else Kubernetes' conventions as cloud load
/// balancers use them: `Local` -> its `healthCheckNodePort` (kube-proxy answers 200 where the
/// node has a ready endpoint), else kube-proxy's own `:10256/healthz`.
fn health_check(svc: &Service) -> Result<Option<HealthCheck>, String> {
    if let Some(v) = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HEALTH_CHECK_ANNOTATION))
    {
        return parse_annotation(v)
            .map_err(|e| format!("annotation {HEALTH_CHECK_ANNOTATION}: {e}"));
    }
    let spec = svc.spec.as_ref();
    let local = spec.and_then(|s| s.external_traffic_policy.as_deref()) == Some("Local");
    let node_port = spec
        .and_then(|s| s.health_check_node_port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    let mut check = match (local, node_port) {
        (true, Some(port)) => HealthCheck::new(CheckProtocol::Http, port, "/"),
        _ => HealthCheck::new(CheckProtocol::Http, KUBE_PROXY_HEALTHZ_PORT, "/healthz"),
    };
    check.implicit = true;
    Ok(Some(check))
}

/// Reads a Service's options; the error names the field and what is accepted.
pub fn service_options(svc: &Service) -> Result<VipOptions, String> {
    let annotations = svc.metadata.annotations.as_ref();
    let mode = match annotations.and_then(|a| a.get(FORWARDING_MODE_ANNOTATION)) {
        None => ForwardingMode::default(),
        Some(v) => v
            .parse()
            .map_err(|e| format!("annotation {FORWARDING_MODE_ANNOTATION}: {e}"))?,
    };
    let spec = svc.spec.as_ref();
    let client_affinity = match spec.and_then(|s| s.session_affinity.as_deref()) {
        None | Some("None") => false,
        Some("ClientIP") => {
            let timeout = spec
                .and_then(|s| s.session_affinity_config.as_ref())
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            if let Some(t) = timeout
                && !(1..=MAX_AFFINITY_TIMEOUT_SECS as i32).contains(&t)
            {
                return Err(format!(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds: {t} is outside 1..={MAX_AFFINITY_TIMEOUT_SECS}"
                ));
            }
            true
        }
        Some(other) => {
            return Err(format!(
                "spec.sessionAffinity: {other:?} is not None or ClientIP"
            ));
        }
    };
    let mut source_ranges = Vec::new();
    for (i, range) in spec
        .and_then(|s| s.load_balancer_source_ranges.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        // Kubernetes accepts host bits here ("10.0.0.1/8"): normalise, as kube-proxy does.
        let cidr = range.trim().parse::<IpNet>().map_err(|_| {
            format!(
                "spec.loadBalancerSourceRanges[{i}]: {range:?} is not a CIDR like 192.0.2.0/24 or 2001:db8::/32"
            )
        })?;
        source_ranges.push(cidr.trunc());
    }
    source_ranges.sort();
    source_ranges.dedup();
    let load_aware = match annotations.and_then(|a| a.get(LOAD_AWARE_ANNOTATION)) {
        None => true,
        Some(v) => match v.trim() {
            "true" => true,
            "false" => false,
            other => {
                return Err(format!(
                    "annotation {LOAD_AWARE_ANNOTATION}: {other:?} is not true or false"
                ));
            }
        },
    };
    Ok(VipOptions {
        mode,
        client_affinity,
        source_ranges,
        health_check: health_check(svc)?,
        load_aware,
    })
}

/// A node's weight from its annotation (default 1).
pub fn node_weight(node: &Node) -> Result<u32, String> {
    match node
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(WEIGHT_ANNOTATION))
    {
        None => Ok(DEFAULT_WEIGHT),
        Some(v) => v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|w| *w <= MAX_WEIGHT)
            .ok_or_else(|| {
                format!(
                    "annotation {WEIGHT_ANNOTATION}: {v:?} is not a whole number from 0 to {MAX_WEIGHT}"
                )
            }),
    }
}

/// Caps every weight at [`MAX_WEIGHT_OVER_MEDIAN`] times the (lower) median of the positive
/// ones; returns (index, weight asked, weight kept, median) of each one capped. Weight 0 (take
/// no flows) never counts towards the median.
pub fn cap_weights(weights: &mut [u32]) -> Vec<(usize, u32, u32, u32)> {
    let mut positive: Vec<u32> = weights.iter().copied().filter(|w| *w > 0).collect();
    if positive.is_empty() {
        return Vec::new();
    }
    positive.sort_unstable();
    let median = positive[(positive.len() - 1) / 2];
    let cap = median
        .saturating_mul(MAX_WEIGHT_OVER_MEDIAN)
        .min(MAX_WEIGHT);
    let mut capped = Vec::new();
    for (i, w) in weights.iter_mut().enumerate() {
        if *w > cap {
            capped.push((i, *w, cap, median));
            *w = cap;
        }
    }
    capped
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn svc(annotations: serde_json::Value, spec: serde_json::Value) -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "annotations": annotations},
            "spec": spec,
        }))
        .expect("service json")
    }

    fn node(annotations: serde_json::Value) -> Node {
        serde_json::from_value(json!({"metadata": {"name": "n1", "annotations": annotations}}))
            .expect("node json")
    }

    #[test]
    fn defaults_without_annotations_or_affinity() {
        let o = service_options(&svc(json!({}), json!({}))).unwrap();
        assert_eq!(o.mode, ForwardingMode::L2);
        assert!(!o.client_affinity && o.source_ranges.is_empty() && o.load_aware);
        // kube-proxy's health endpoint, by convention (not held against a node without one).
        let check = o.health_check.unwrap();
        assert_eq!(check.to_string(), "http:10256/healthz");
        assert!(check.implicit);
    }

    #[test]
    fn forwarding_mode_any_case_and_bad_value_named() {
        let o = service_options(&svc(json!({FORWARDING_MODE_ANNOTATION: "IPIP"}), json!({})));
        assert_eq!(o.unwrap().mode, ForwardingMode::Ipip);
        let e = service_options(&svc(json!({FORWARDING_MODE_ANNOTATION: "gre"}), json!({})))
            .unwrap_err();
        assert!(
            e.contains("sluice.io/forwarding-mode") && e.contains("\"gre\""),
            "{e}"
        );
    }

    #[test]
    fn client_ip_affinity_with_default_and_explicit_timeout() {
        let o = service_options(&svc(json!({}), json!({"sessionAffinity": "ClientIP"})));
        assert!(o.unwrap().client_affinity);
        let o = service_options(&svc(
            json!({}),
            json!({"sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}}),
        ));
        assert!(o.unwrap().client_affinity);
        let o = service_options(&svc(json!({}), json!({"sessionAffinity": "None"})));
        assert!(!o.unwrap().client_affinity);
        let e = service_options(&svc(
            json!({}),
            json!({"sessionAffinity": "ClientIP",
                   "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 0}}}),
        ))
        .unwrap_err();
        assert!(e.contains("timeoutSeconds: 0"), "{e}");
    }

    #[test]
    fn source_ranges_normalised_sorted_both_families_kept_bad_ones_named() {
        let o = service_options(&svc(
            json!({}),
            json!({"loadBalancerSourceRanges":
                ["192.0.2.77/24", "10.0.0.0/8", "2001:db8::1/32", "10.0.0.0/8", "0.0.0.0/0"]}),
        ))
        .unwrap();
        let shown: Vec<String> = o.source_ranges.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["0.0.0.0/0", "10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"]
        );
        // Only IPv6 ranges: kept (an IPv4 VIP then admits no client), never dropped (which
        // would admit every one).
        let o = service_options(&svc(
            json!({}),
            json!({"loadBalancerSourceRanges": ["2001:db8::/32"]}),
        ))
        .unwrap();
        assert_eq!(o.source_ranges.len(), 1);
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8"] {
            let e = service_options(&svc(
                json!({}),
                json!({"loadBalancerSourceRanges": ["10.1.0.0/16", bad]}),
            ))
            .unwrap_err();
            assert!(e.contains("loadBalancerSourceRanges[1]"), "{e}");
        }
    }

    #[test]
    fn health_check_conventions_annotation_and_load_opt_out() {
        let local = json!({"externalTrafficPolicy": "Local", "healthCheckNodePort": 31234});
        let o = service_options(&svc(json!({}), local.clone())).unwrap();
        assert_eq!(o.health_check.unwrap().to_string(), "http:31234/");
        let o = service_options(&svc(json!({HEALTH_CHECK_ANNOTATION: "tcp:80"}), local)).unwrap();
        let check = o.health_check.unwrap();
        assert_eq!(check.to_string(), "tcp:80");
        assert!(!check.implicit);
        let o = service_options(&svc(
            json!({HEALTH_CHECK_ANNOTATION: "off", LOAD_AWARE_ANNOTATION: "false"}),
            json!({}),
        ))
        .unwrap();
        assert!(o.health_check.is_none() && !o.load_aware);
        for (k, v) in [
            (HEALTH_CHECK_ANNOTATION, "icmp"),
            (LOAD_AWARE_ANNOTATION, "no"),
        ] {
            let e = service_options(&svc(json!({k: v}), json!({}))).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn node_weight_default_range_and_errors() {
        assert_eq!(node_weight(&node(json!({}))), Ok(1));
        assert_eq!(node_weight(&node(json!({WEIGHT_ANNOTATION: "3"}))), Ok(3));
        assert_eq!(node_weight(&node(json!({WEIGHT_ANNOTATION: "0"}))), Ok(0));
        assert_eq!(
            node_weight(&node(json!({WEIGHT_ANNOTATION: " 10000 "}))),
            Ok(10_000)
        );
        for bad in ["10001", "-1", "1.5", "heavy", ""] {
            let e = node_weight(&node(json!({WEIGHT_ANNOTATION: bad}))).unwrap_err();
            assert!(e.contains("sluice.io/weight"), "{e}");
        }
    }

    #[test]
    fn annotation_forms_and_errors() {
        assert_eq!(parse_annotation("off"), Ok(None));
        let c = parse_annotation("http:10256/healthz").unwrap().unwrap();
        assert_eq!(c, HealthCheck::new(CheckProtocol::Http, 10256, "/healthz"));
        let c = parse_annotation("tcp:80 interval=2s timeout=300ms fall=2 rise=5")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.protocol, c.port, c.interval, c.timeout, c.fall, c.rise),
            (
                CheckProtocol::Tcp,
                80,
                Duration::from_secs(2),
                Duration::from_millis(300),
                2,
                5
            )
        );
        assert_eq!(c.to_string(), "tcp:80");
        for bad in [
            "",
            "udp:53",
            "http:x/",
            "http:0/",
            "tcp:80/x",
            "http:80 fall=0",
            "http:80 timeout=2s",
            "http:80 colour=red",
            "off now",
        ] {
            assert!(parse_annotation(bad).is_err(), "{bad:?}");
        }
    }

    /// Issue 25 item 5: a node's own credentials set its weight to 10,000 among nine nodes of
    /// weight 1: it keeps 8 (8/17 of the flows, not 10000/10009), and weights within the factor
    /// and zeros stay as they are.
    #[test]
    fn one_nodes_weight_is_capped_at_a_multiple_of_the_median() {
        let mut w = vec![1, 1, 1, 1, 10_000, 1, 1, 1, 1, 1];
        let capped = cap_weights(&mut w);
        assert_eq!(capped, [(4, 10_000, 8, 1)]);
        assert_eq!(w, [1, 1, 1, 1, 8, 1, 1, 1, 1, 1]);
        let share = f64::from(w[4]) / f64::from(w.iter().sum::<u32>());
        let mean = 1.0 / w.len() as f64;
        assert!(share <= 16.0 * mean && share < 0.48, "{share}");
        let mut w = vec![0, 0, 0, 2, 16, 3];
        assert!(cap_weights(&mut w).is_empty(), "{w:?}");
        let mut w = vec![0, 0, 0];
        assert!(cap_weights(&mut w).is_empty());
    }
}
