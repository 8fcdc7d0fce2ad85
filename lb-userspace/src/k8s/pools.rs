//! The address pools as a Kubernetes resource (`IPAddressPool.sluice.io`, cluster-scoped), and
//! the Services as the allocator's claims: the API's objects in, `ipam`'s plain values out.
//! The CustomResourceDefinition in `deploy/` is generated from these types (a test compares).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client, CustomResource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use super::agent::watch;
use super::crd_watch::{Absent, WhenInstalled, watch_when_installed};
use super::watch_metrics::WatchMetrics;
use crate::ipam::{Claim, Family, PoolSpec, PortProto};

/// Watches the IPAddressPools once the resource is installed (and this agent may list it):
/// until then sluice owns no address.
pub async fn watch_pools(
    client: &Client,
    changed: Arc<Notify>,
    metrics: Option<WatchMetrics>,
) -> WhenInstalled<Store<IPAddressPool>> {
    let absent = Absent {
        meanwhile: "sluice owns no address",
        install: "apply deploy/base/05-crd-ipaddresspools.yaml and a pool to let it assign and announce",
    };
    let on_change = changed.clone();
    watch_when_installed::<IPAddressPool, _, _, _>(client, absent, changed, |client| async move {
        let api: Api<IPAddressPool> = Api::all(client);
        watch(api, watcher::Config::default(), on_change, metrics)
    })
    .await
}

/// The `spec.loadBalancerClass` sluice serves (and, unless told otherwise, Services with none).
pub const LOAD_BALANCER_CLASS: &str = "sluice.io/lb";
/// Addresses a Service asks for, comma-separated, both families (MetalLB's
/// `metallb.universe.tf/loadBalancerIPs` means the same).
pub const REQUESTED_IPS_ANNOTATION: &str = "sluice.io/load-balancer-ips";
/// Services with the same value may share an address (MetalLB's `allow-shared-ip`).
pub const SHARING_KEY_ANNOTATION: &str = "sluice.io/allow-shared-ip";

/// A pool of addresses sluice may assign to LoadBalancer Services and announce.
#[derive(CustomResource, Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[kube(
    group = "sluice.io",
    version = "v1alpha1",
    kind = "IPAddressPool",
    plural = "ipaddresspools",
    shortname = "sluicepool",
    status = "IPAddressPoolStatus",
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    printcolumn = r#"{"name":"Valid","type":"string","jsonPath":".status.conditions[0].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    /// CIDRs (`192.168.10.0/24`, `fd00:10::/120`), ranges (`192.168.10.10-192.168.10.20`) or
    /// single addresses, of either family.
    pub addresses: Vec<String>,
    /// Services without a requested address get theirs from this pool (default true).
    #[serde(default = "default_true")]
    pub auto_assign: bool,
    /// Never hand out IPv4 addresses ending in .0 or .255.
    #[serde(default)]
    pub avoid_buggy_ips: bool,
    /// Serve a Service's `spec.externalIPs` that lie in this pool (off: anyone who can create a
    /// Service could otherwise claim them, CVE-2020-8554).
    #[serde(default)]
    pub allow_external_ips: bool,
    /// Which Services may use the pool (all when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
    /// What BGP announces with this pool's addresses (with `--bgp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<PoolBgp>,
}

/// The BGP attributes of a pool's routes: steer traffic per class of Service.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolBgp {
    /// Standard communities `HIGH:LOW` (each 0 to 65535, at most 32), after the agent's
    /// `--bgp-communities`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// LOCAL_PREF sent to iBGP peers (the same AS) [default: 100]; eBGP peers get none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
}

impl PoolBgp {
    /// The pool's attributes as the speaker takes them, or why they are unusable.
    pub fn advert(&self) -> Result<crate::bgp::PoolAdvert, String> {
        let communities = crate::bgp::parse_communities(&self.communities.join(","))?;
        if communities.len() > crate::bgp::MAX_POOL_COMMUNITIES {
            return Err(format!(
                "{} communities, at most {}",
                communities.len(),
                crate::bgp::MAX_POOL_COMMUNITIES
            ));
        }
        Ok(crate::bgp::PoolAdvert {
            communities,
            local_pref: self.local_pref,
        })
    }
}

fn default_true() -> bool {
    true
}

/// Which Services may use a pool.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Only Services in these namespaces (all when empty).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Only Services carrying all of these labels.
    #[serde(default)]
    pub service_labels: BTreeMap<String, String>,
}

/// What the allocator found of the pool.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
pub struct IPAddressPoolStatus {
    /// `Valid`: "True", or "False" with the reason.
    #[serde(default)]
    pub conditions: Vec<PoolCondition>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
    pub reason: String,
    pub message: String,
}

/// The pool as the allocator takes it.
pub fn pool_spec(p: &IPAddressPool) -> PoolSpec {
    let alloc = p.spec.service_allocation.clone().unwrap_or_default();
    PoolSpec {
        name: p.metadata.name.clone().unwrap_or_default(),
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        addresses: p.spec.addresses.clone(),
        auto_assign: p.spec.auto_assign,
        avoid_buggy_ips: p.spec.avoid_buggy_ips,
        allow_external_ips: p.spec.allow_external_ips,
        namespaces: alloc.namespaces,
        service_labels: alloc.service_labels,
    }
}

/// Which Services are sluice's to serve, by `spec.loadBalancerClass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassPolicy {
    /// Services without a class are sluice's too (the default; off beside another
    /// implementation that takes those).
    pub unclassed: bool,
}

impl Default for ClassPolicy {
    fn default() -> Self {
        ClassPolicy { unclassed: true }
    }
}

impl ClassPolicy {
    /// Whether `svc` is sluice's: its class, or none when [`ClassPolicy::unclassed`]. A Service
    /// of another class is left entirely alone (no VIP, no announcement, no status).
    pub fn owns(&self, svc: &Service) -> bool {
        match svc
            .spec
            .as_ref()
            .and_then(|s| s.load_balancer_class.as_deref())
        {
            None => self.unclassed,
            Some(c) => c == LOAD_BALANCER_CLASS,
        }
    }
}

/// The addresses of a Service's `status.loadBalancer.ingress`, as written (unparsed).
pub fn ingress_ips(svc: &Service) -> impl Iterator<Item = &str> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref())
}

/// The Service as the allocator's claim, or why it cannot be one (a bad annotation: it gets no
/// address and an Event).
pub fn claim(svc: &Service) -> Result<Claim, String> {
    let meta = &svc.metadata;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let key = format!("{namespace}/{}", meta.name.as_deref().unwrap_or_default());
    let spec = svc.spec.clone().unwrap_or_default();
    let annotations = meta.annotations.clone().unwrap_or_default();
    let mut requested = Vec::new();
    if let Some(list) = annotations.get(REQUESTED_IPS_ANNOTATION) {
        for raw in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            requested.push(raw.parse::<IpAddr>().map_err(|_| {
                format!("annotation {REQUESTED_IPS_ANNOTATION}: {raw:?} is not an IP address")
            })?);
        }
    } else if let Some(raw) = spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
        requested.push(
            raw.parse()
                .map_err(|_| format!("spec.loadBalancerIP {raw:?} is not an IP address"))?,
        );
    }
    let mut families: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| match f.as_str() {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        })
        .collect();
    let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    if policy == "SingleStack" {
        families.truncate(1);
    }
    if families.is_empty() {
        // An API server that fills no family (older ones): the requested addresses', or IPv4.
        families = match requested.first() {
            Some(a) => vec![Family::of(*a)],
            None => vec![Family::V4],
        };
    }
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let protocol = match p.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "TCP",
                "UDP" => "UDP",
                "SCTP" => "SCTP",
                _ => return None,
            };
            Some(PortProto {
                port: u16::try_from(p.port).ok()?,
                protocol,
            })
        })
        .collect();
    let parse_all =
        |v: &[String]| -> Vec<IpAddr> { v.iter().filter_map(|s| s.parse().ok()).collect() };
    let current = ingress_ips(svc).filter_map(|ip| ip.parse().ok()).collect();
    Ok(Claim {
        key,
        namespace,
        labels: meta.labels.clone().unwrap_or_default(),
        created: meta
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        load_balancer: spec.type_.as_deref() == Some("LoadBalancer"),
        families,
        require_all: policy == "RequireDualStack",
        requested,
        sharing_key: annotations
            .get(SHARING_KEY_ANNOTATION)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        ports,
        local_policy: spec.external_traffic_policy.as_deref() == Some("Local"),
        current,
        external_ips: parse_all(spec.external_ips.as_deref().unwrap_or_default()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn svc(v: serde_json::Value) -> Service {
        serde_json::from_value(v).unwrap()
    }

    /// The CRD in deploy/ is what these types generate: the schema cannot drift.
    #[test]
    fn the_deployed_crd_is_the_generated_one() {
        crate::k8s::crd_watch::assert_deployed_crd_is_generated::<IPAddressPool>(
            "05-crd-ipaddresspools.yaml",
            "pools.rs",
            "the_deployed_crd_is_the_generated_one",
        );
    }

    #[test]
    fn class_selects_the_implementation() {
        let none = svc(json!({"spec": {"type": "LoadBalancer"}}));
        let ours = svc(
            json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": LOAD_BALANCER_CLASS}}),
        );
        let other = svc(
            json!({"spec": {"type": "LoadBalancer", "loadBalancerClass": "metallb.io/metallb"}}),
        );
        let default = ClassPolicy::default();
        assert!(default.owns(&none) && default.owns(&ours) && !default.owns(&other));
        let strict = ClassPolicy { unclassed: false };
        assert!(!strict.owns(&none) && strict.owns(&ours) && !strict.owns(&other));
    }

    #[test]
    fn a_service_becomes_a_claim() {
        let c = claim(&svc(json!({
            "metadata": {"namespace": "prod", "name": "dns", "uid": "u1",
                "creationTimestamp": "2026-01-02T03:04:05Z",
                "annotations": {REQUESTED_IPS_ANNOTATION: "10.0.0.5, fd00::5", SHARING_KEY_ANNOTATION: "dns"}},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack",
                "externalTrafficPolicy": "Local",
                "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.5"}]}}
        })))
        .unwrap();
        assert_eq!(c.key, "prod/dns");
        assert_eq!(c.families, [Family::V4, Family::V6]);
        assert!(c.require_all && c.local_policy && c.load_balancer);
        assert_eq!(c.requested.len(), 2);
        assert_eq!(c.sharing_key.as_deref(), Some("dns"));
        assert_eq!(c.ports.len(), 2);
        assert_eq!(c.current, ["10.0.0.5".parse::<IpAddr>().unwrap()]);
        // SingleStack takes the first family; spec.loadBalancerIP is the older request.
        let c = claim(&svc(
            json!({"spec": {"type": "LoadBalancer", "ipFamilies": ["IPv6", "IPv4"],
            "loadBalancerIP": "fd00::9"}}),
        ))
        .unwrap();
        assert_eq!(c.families, [Family::V6]);
        assert_eq!(c.requested, ["fd00::9".parse::<IpAddr>().unwrap()]);
        let e = claim(&svc(
            json!({"metadata": {"annotations": {REQUESTED_IPS_ANNOTATION: "nope"}}}),
        ))
        .unwrap_err();
        assert!(e.contains(REQUESTED_IPS_ANNOTATION) && e.contains("nope"));
    }
}
