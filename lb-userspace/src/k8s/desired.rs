//! Services, EndpointSlices and Nodes -> the desired model. A pure function of the API objects:
//! the same objects always give the same model, so a relist or an agent restart rebuilds exactly
//! the maps that were there.
//!
//! - Only Services of sluice's `loadBalancerClass` (and, unless told otherwise, of none): another
//!   class is left entirely alone.
//! - A VIP per (address, port, protocol), ports from `spec.ports` (TCP and UDP), addresses of
//!   both families (a dual-stack Service gets VIPs of both). With address pools (IPAddressPool
//!   resources): only what the allocation (`ipam`) gives the Service and its status shows, and
//!   its `spec.externalIPs` inside a pool that allows them; those addresses, and no other, may
//!   be announced. Without any pool ("beside MetalLB"): every address of
//!   `status.loadBalancer.ingress[].ip` and `spec.externalIPs`, announced by nobody.
//! - Two Services claiming one VIP: the older (creation time, then uid) keeps it, on every agent.
//! - Its backends are NODES, by InternalIP (the node's kube-proxy or CNI takes the packet on to a
//!   pod), of the VIP's family where the node has one; else, in mode `ipip` only, by the other
//!   family's (IPIP carries IPv6, IP6IP6 carries IPv4); in mode `l2` such a node is left out of
//!   that VIP and reported. `externalTrafficPolicy: Cluster`: every node, active when Ready and schedulable.
//!   `Local`: only nodes with an endpoint of the Service, weighted by their ready endpoints.
//! - Draining (keeps its flows, takes no new ones): a NotReady or unschedulable (cordoned) node, a
//!   node labelled `node.kubernetes.io/exclude-from-external-load-balancers`,
//!   and under `Local` a node whose only endpoints are serving but terminating.
//! - A node's `sluice.io/weight` annotation multiplies its share.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::options::{
    MAX_WEIGHT_OVER_MEDIAN, VipOptions, WEIGHT_ANNOTATION, cap_weights, node_weight,
    service_options,
};
use super::pools::{ClassPolicy, claim, ingress_ips};
use crate::ipam::{self, Allocation, PoolSpec, Pools};
use crate::model::{
    Backend, Backends, DEFAULT_WEIGHT, Desired, ForwardingMode, ListId, MAX_WEIGHT, Protocol,
    Settings, Vip, VipAddr,
};
use crate::node_state;

/// The label the EndpointSlice controller puts on a Service's slices.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Where a VIP comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSource {
    /// "namespace/name" of the Service (shared by its VIPs).
    pub service: Arc<str>,
    pub options: Arc<VipOptions>,
}

/// The model and what it was built from, for logging.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Built {
    pub desired: Desired,
    pub sources: BTreeMap<VipAddr, VipSource>,
    /// Node names by InternalIP (backends are nodes).
    pub node_names: BTreeMap<IpAddr, String>,
    /// "kind namespace/name: what is wrong" for everything ignored, wholly or in part.
    pub problems: BTreeSet<String>,
    /// The pools and who holds which address (`None` without any pool).
    pub addressing: Option<Addressing>,
}

/// Which addresses are sluice's: what `build` takes besides the objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// The IPAddressPool resources (none: sluice owns no address, see the module doc).
    pub pools: Vec<PoolSpec>,
    pub class: ClassPolicy,
}

/// The pools and the allocation, as every agent computes them from the same objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Addressing {
    pub pools: Pools,
    pub allocation: Allocation,
    /// The Services' current `status.loadBalancer.ingress` addresses (namespace/name ->).
    pub status: BTreeMap<String, Vec<IpAddr>>,
    /// The served addresses: all in a pool, the only ones that may be announced.
    pub announceable: BTreeSet<IpAddr>,
}

impl Built {
    /// The addresses this cluster may announce (ARP/NDP or BGP): pool addresses only.
    pub fn announceable(&self) -> BTreeSet<IpAddr> {
        self.addressing
            .as_ref()
            .map(|a| a.announceable.clone())
            .unwrap_or_default()
    }
}

/// The one place where a Service's options (parsed and validated in `options`) reach the
/// dataplane model. ClientIP affinity has no timeout in sluice: the hash keeps a client on one
/// backend for as long as the backend set stays the same, which is at least as sticky.
fn apply_options(vip: &mut Vip, options: &VipOptions) {
    vip.mode = options.mode;
    vip.client_affinity = options.client_affinity;
    vip.source_ranges = options.source_ranges.clone();
    vip.health_check = options.health_check.clone();
}

/// What the balancer needs to know of a node.
#[derive(Clone, Debug, Hash)]
struct NodeInfo {
    name: String,
    /// Its first InternalIP of each family (at least one of the two).
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    /// Ready, schedulable and not excluded from external load balancing: may take new flows.
    healthy: bool,
    weight: u32,
}

impl NodeInfo {
    /// The address that makes the node a backend of a VIP of `vip`'s family in `mode`: its own
    /// of that family, else (encapsulation crosses families; an L2 rewrite cannot) the other.
    fn backend_addr(&self, vip: IpAddr, mode: ForwardingMode) -> Option<IpAddr> {
        let (same, other) = match vip {
            IpAddr::V4(_) => (self.v4.map(IpAddr::V4), self.v6.map(IpAddr::V6)),
            IpAddr::V6(_) => (self.v6.map(IpAddr::V6), self.v4.map(IpAddr::V4)),
        };
        same.or(match mode {
            ForwardingMode::Ipip => other,
            ForwardingMode::L2 => None,
        })
    }

    fn addrs(&self) -> impl Iterator<Item = IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
    }
}

/// Per node (by name): ready endpoints, and serving-but-terminating ones.
#[derive(Clone, Copy, Debug, Default)]
struct LocalEndpoints {
    ready: u32,
    terminating: u32,
}

fn object_name(namespace: Option<&str>, name: Option<&str>) -> String {
    match namespace {
        Some(ns) => format!("{ns}/{}", name.unwrap_or("?")),
        None => name.unwrap_or("?").to_owned(),
    }
}

/// Builds the desired model from everything the watchers hold.
pub fn build(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    nodes: &[Arc<Node>],
    settings: Settings,
    policy: &AddressPolicy,
) -> Built {
    build_with(
        &mut BuildCache::default(),
        services,
        slices,
        nodes,
        settings,
        policy,
    )
}

/// What each Service gave the last build, reused while its inputs are the same: its own and
/// its slices' resource versions, its addresses and the nodes. An EndpointSlice change then
/// rebuilds one Service, not 5,000. Objects without a resource version (built by hand, not
/// read from the API) are never reused.
#[derive(Default)]
pub struct BuildCache {
    services: HashMap<String, (u64, ServiceVips)>,
}

/// One Service's VIPs and what was wrong with it, before the VIPs meet other Services'.
#[derive(Clone, Default)]
struct ServiceVips {
    /// "namespace/name": one allocation for all its VIPs' sources.
    who: Arc<str>,
    vips: Vec<Vip>,
    options: Arc<VipOptions>,
    problems: Vec<String>,
}

/// [`build`], reusing what `cache` holds from the last builds (and keeping this one's).
pub fn build_with(
    cache: &mut BuildCache,
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    nodes: &[Arc<Node>],
    settings: Settings,
    policy: &AddressPolicy,
) -> Built {
    let mut built = Built {
        desired: Desired {
            settings,
            ..Desired::default()
        },
        ..Built::default()
    };
    let nodes = node_infos(nodes, &mut built);
    // Every node runs the agent (a DaemonSet): all of them balance, this one included.
    built.desired.peers = nodes.iter().flat_map(NodeInfo::addrs).collect();
    let mut services: Vec<&Service> = services
        .iter()
        .map(AsRef::as_ref)
        .filter(|s| policy.class.owns(s))
        .collect();
    // Two Services claiming one VIP: the older keeps it, on every agent (never by name: a new
    // `aaa/x` must not take `prod/web`'s address).
    // Compared in place: cloning the names for a key costs an allocation per comparison.
    services.sort_by(|a, b| claim_order(a).cmp(&claim_order(b)));
    if !policy.pools.is_empty() {
        built.addressing = Some(addressing(&services, policy, &mut built.problems));
    }
    // Slices by their Service, so that each Service reads only its own.
    let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        let ns = slice.metadata.namespace.as_deref().unwrap_or("");
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            by_service.entry((ns, svc)).or_default().push(slice);
        }
    }
    let mut per_family = PerFamily::default();
    let nodes_print = fingerprint(&nodes);
    // Each Service's VIPs, in claim order.
    let mut made_all: Vec<(String, Option<u64>, ServiceVips)> = Vec::with_capacity(services.len());
    for svc in services {
        let key = (
            svc.metadata.namespace.as_deref().unwrap_or(""),
            svc.metadata.name.as_deref().unwrap_or(""),
        );
        let own = by_service.get(&key).map(Vec::as_slice).unwrap_or_default();
        let who = object_name(
            svc.metadata.namespace.as_deref(),
            svc.metadata.name.as_deref(),
        );
        let Some(addrs) = served_addresses(svc, &who, &mut built) else {
            continue;
        };
        let inputs = inputs_print(svc, own, &addrs, nodes_print);
        let made = match (inputs, cache.services.remove(&who)) {
            (Some(print), Some((was, made))) if print == was => made,
            _ => service_vips(svc, &who, own, &nodes, &addrs, &mut per_family),
        };
        built.problems.extend(made.problems.iter().cloned());
        made_all.push((who, inputs, made));
    }
    add_services(&made_all, &mut built);
    // Services gone (or changed beyond reuse) leave the cache with this build.
    cache.services = made_all
        .into_iter()
        .filter_map(|(who, print, made)| Some((who, (print?, made))))
        .collect();
    built
}

/// Of everything a Service's VIPs are a function of, besides the nodes' `nodes_print`: the
/// Service's and its slices' identities and resource versions, and its addresses. `None` when
/// an object has no resource version (never reused).
fn inputs_print(
    svc: &Service,
    slices: &[&EndpointSlice],
    addrs: &[IpAddr],
    nodes_print: u64,
) -> Option<u64> {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nodes_print.hash(&mut h);
    addrs.hash(&mut h);
    svc.metadata.uid.hash(&mut h);
    svc.metadata.resource_version.as_ref()?.hash(&mut h);
    let mut own: Vec<(&str, &str)> = Vec::with_capacity(slices.len());
    for slice in slices {
        own.push((
            slice.metadata.name.as_deref().unwrap_or(""),
            slice.metadata.resource_version.as_deref()?,
        ));
    }
    own.sort_unstable();
    own.hash(&mut h);
    Some(h.finish())
}

/// Which of two Services claiming one address keeps it: the older, then by uid and name.
fn claim_order(
    s: &Service,
) -> (
    Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    Option<&str>,
    Option<&str>,
    Option<&str>,
) {
    let m = &s.metadata;
    (
        m.creation_timestamp.as_ref(),
        m.uid.as_deref(),
        m.namespace.as_deref(),
        m.name.as_deref(),
    )
}

fn fingerprint(nodes: &[NodeInfo]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    nodes.hash(&mut h);
    h.finish()
}

fn node_infos(nodes: &[Arc<Node>], built: &mut Built) -> Vec<NodeInfo> {
    let mut infos: Vec<NodeInfo> = Vec::new();
    let mut sorted: Vec<&Node> = nodes.iter().map(AsRef::as_ref).collect();
    sorted.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
    for node in sorted {
        let name = node.metadata.name.clone().unwrap_or_default();
        let status = node.status.as_ref();
        let internal: Vec<IpAddr> = status
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse::<IpAddr>().ok())
            .collect();
        let v4 = internal.iter().find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        });
        let v6 = internal.iter().find_map(|a| match a {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        });
        if v4.is_none() && v6.is_none() {
            built
                .problems
                .insert(format!("node {name}: no InternalIP, not a backend"));
            continue;
        }
        let mine = || v4.map(IpAddr::V4).into_iter().chain(v6.map(IpAddr::V6));
        if let Some((other, addr)) =
            mine().find_map(|a| built.node_names.get(&a).map(|other| (other.clone(), a)))
        {
            built.problems.insert(format!(
                "node {name}: InternalIP {addr} is also node {other}'s, not a backend"
            ));
            continue;
        }
        // A node excluded from external load balancing drains as a cordoned one does: it keeps
        // its established flows and takes no new ones.
        let takes_new_flows = node_state::is_ready(node)
            && !node_state::is_cordoned(node)
            && !node_state::is_excluded(node);
        let weight = node_weight(node).unwrap_or_else(|e| {
            built
                .problems
                .insert(format!("node {name}: {e}; using weight {DEFAULT_WEIGHT}"));
            DEFAULT_WEIGHT
        });
        for addr in mine() {
            built.node_names.insert(addr, name.clone());
        }
        infos.push(NodeInfo {
            name,
            v4,
            v6,
            healthy: takes_new_flows,
            weight,
        });
    }
    // One node's annotation (its own kubelet may write it) takes at most a bounded multiple of
    // a typical node's share.
    let mut weights: Vec<u32> = infos.iter().map(|n| n.weight).collect();
    for (i, asked, kept, median) in cap_weights(&mut weights) {
        built.problems.insert(format!(
            "node {}: annotation {WEIGHT_ANNOTATION} {asked} is over {MAX_WEIGHT_OVER_MEDIAN} times the median node weight ({median}): using {kept}",
            infos[i].name
        ));
        infos[i].weight = kept;
    }
    infos
}

/// The pools, validated, and the allocation over the Services (oldest first).
fn addressing(
    services: &[&Service],
    policy: &AddressPolicy,
    problems: &mut BTreeSet<String>,
) -> Addressing {
    let pools = Pools::validate(policy.pools.clone());
    for (name, why) in &pools.invalid {
        problems.insert(format!("IPAddressPool {name}: {why}; it is not used"));
    }
    let mut claims = Vec::new();
    let mut status = BTreeMap::new();
    for svc in services {
        if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            continue;
        }
        match claim(svc) {
            Ok(c) => {
                status.insert(c.key.clone(), c.current.clone());
                claims.push(c);
            }
            Err(e) => {
                let who = object_name(
                    svc.metadata.namespace.as_deref(),
                    svc.metadata.name.as_deref(),
                );
                problems.insert(format!("service {who}: {e}; it gets no address"));
            }
        }
    }
    let allocation = ipam::allocate(&pools, &claims);
    let announceable = claims
        .iter()
        .flat_map(|c| allocation.served(&c.key, &c.current))
        .collect();
    Addressing {
        pools,
        allocation,
        status,
        announceable,
    }
}

fn service_addresses(svc: &Service, who: &str, problems: &mut BTreeSet<String>) -> Vec<IpAddr> {
    let ingress = ingress_ips(svc);
    let external = svc
        .spec
        .as_ref()
        .and_then(|s| s.external_ips.as_ref())
        .into_iter()
        .flatten()
        .map(String::as_str);
    let mut addrs = BTreeSet::new();
    for raw in ingress.chain(external) {
        match raw.parse::<IpAddr>() {
            Ok(a) => {
                addrs.insert(a);
            }
            Err(_) => {
                problems.insert(format!(
                    "service {who}: address {raw:?} is not an IPv4 or IPv6 address"
                ));
            }
        }
    }
    addrs.into_iter().collect()
}

/// The addresses a Service's VIPs are served at (none: it has no VIP).
fn served_addresses(svc: &Service, who: &str, built: &mut Built) -> Option<Vec<IpAddr>> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let addrs = match &built.addressing {
        None => service_addresses(svc, who, &mut built.problems),
        Some(a) => a.allocation.served(
            who,
            a.status.get(who).map(Vec::as_slice).unwrap_or_default(),
        ),
    };
    (!addrs.is_empty()).then_some(addrs)
}

/// One Service's VIPs at `addrs`, alone (what other Services claim is [`add_service`]'s).
fn service_vips(
    svc: &Service,
    who: &str,
    slices: &[&EndpointSlice],
    nodes: &[NodeInfo],
    addrs: &[IpAddr],
    per_family: &mut PerFamily,
) -> ServiceVips {
    let mut out = ServiceVips {
        who: who.into(),
        ..ServiceVips::default()
    };
    let Some(spec) = svc.spec.as_ref() else {
        return out;
    };
    out.options = match service_options(svc) {
        Ok(o) => Arc::new(o),
        Err(e) => {
            out.problems
                .push(format!("service {who}: {e}; its VIPs are not served"));
            return out;
        }
    };
    let options = &out.options;
    let local = spec.external_traffic_policy.as_deref() == Some("Local");
    for port in spec.ports.as_deref().unwrap_or_default() {
        let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
            "TCP" => Protocol::Tcp,
            "UDP" => Protocol::Udp,
            other => {
                out.problems.push(format!(
                    "service {who}: port {}: protocol {other} is not balanced (TCP and UDP are)",
                    port.port
                ));
                continue;
            }
        };
        let Ok(number) = u16::try_from(port.port) else {
            continue;
        };
        if number == 0 {
            continue;
        }
        // Per family: a VIP's packets reach pods of its own family (kube-proxy's proxier of
        // that family), and a dual-stack pod is listed once in each family's slices.
        let endpoints = local.then(|| {
            let port_name = port.name.as_deref().unwrap_or("");
            [
                local_endpoints(slices, port_name, "IPv4"),
                local_endpoints(slices, port_name, "IPv6"),
            ]
        });
        for addr in addrs {
            let (all_nodes, unreachable) = per_family.get(nodes, *addr, options.mode);
            for name in unreachable {
                let family = if addr.is_ipv4() { 4 } else { 6 };
                out.problems.push(format!(
                    "service {who}: node {name} has no IPv{family} InternalIP, which mode l2 needs for the IPv{family} VIPs: not their backend (use mode ipip to reach it by its other address)",
                ));
            }
            let backends: Backends = match &endpoints {
                Some([v4, v6]) => {
                    let endpoints = if addr.is_ipv4() { v4 } else { v6 };
                    local_backends(endpoints, nodes, *addr, options.mode).into()
                }
                None => all_nodes,
            };
            let key = VipAddr {
                addr: *addr,
                port: number,
                protocol,
            };
            let mut vip = Vip::new(key, backends);
            apply_options(&mut vip, options);
            out.vips.push(vip);
        }
    }
    out
}

/// The Services' VIPs (`made`, in claim order) into the model, each to the first Service that
/// claims it. Sorted once by VIP rather than inserted one by one: 10,000 VIPs every pass.
fn add_services(made: &[(String, Option<u64>, ServiceVips)], built: &mut Built) {
    let mut claims: Vec<(VipAddr, usize, &Vip)> = made
        .iter()
        .enumerate()
        .flat_map(|(order, (_, _, m))| m.vips.iter().map(move |vip| (vip.key, order, vip)))
        .collect();
    claims.sort_unstable_by_key(|(key, order, _)| (*key, *order));
    let mut vips = Vec::with_capacity(claims.len());
    let mut sources = Vec::with_capacity(claims.len());
    for (key, order, vip) in claims {
        let this = &made[order].2;
        match sources.last() {
            Some((owned, first)) if *owned == key => {
                let first: &VipSource = first;
                if first.service != this.who {
                    built.problems.insert(format!(
                        "service {}: VIP {key} is already served for {}",
                        this.who, first.service
                    ));
                }
            }
            _ => {
                sources.push((
                    key,
                    VipSource {
                        service: this.who.clone(),
                        options: this.options.clone(),
                    },
                ));
                vips.push(vip.clone());
            }
        }
    }
    built.desired.vips = vips;
    // In key order already: built in one go.
    built.sources = sources.into_iter().collect();
}

/// What every VIP of one family and mode has under `externalTrafficPolicy: Cluster` (every
/// node, one shared list) and the nodes it cannot reach: worked out once per build, not once per
/// VIP (10,000 VIP ports on 1,000 nodes would be 10 million backends built and compared).
#[derive(Default)]
struct PerFamily(HashMap<(bool, ForwardingMode), (Backends, Vec<String>)>);

impl PerFamily {
    fn get(
        &mut self,
        nodes: &[NodeInfo],
        vip: IpAddr,
        mode: ForwardingMode,
    ) -> (Backends, &[String]) {
        let (list, unreachable) = self.0.entry((vip.is_ipv4(), mode)).or_insert_with(|| {
            let unreachable = nodes
                .iter()
                .filter(|n| n.backend_addr(vip, mode).is_none())
                .map(|n| n.name.clone())
                .collect();
            (cluster_backends(nodes, vip, mode).into(), unreachable)
        });
        (list.clone(), unreachable)
    }
}

fn cluster_backends(nodes: &[NodeInfo], vip: IpAddr, mode: ForwardingMode) -> Vec<Backend> {
    let mut backends: Vec<Backend> = nodes
        .iter()
        .filter_map(|n| Some((n, n.backend_addr(vip, mode)?)))
        .map(|(n, addr)| Backend {
            addr,
            mac: None,
            weight: n.weight,
            drain: !n.healthy,
        })
        .collect();
    backends.sort_by_key(|b| b.addr);
    backends
}

fn local_backends(
    endpoints: &BTreeMap<String, LocalEndpoints>,
    nodes: &[NodeInfo],
    vip: IpAddr,
    mode: ForwardingMode,
) -> Vec<Backend> {
    let mut backends: Vec<Backend> = nodes
        .iter()
        .filter_map(|n| {
            let e = endpoints.get(&n.name)?;
            let addr = n.backend_addr(vip, mode)?;
            if e.ready > 0 {
                Some(Backend {
                    addr,
                    mac: None,
                    weight: e.ready.saturating_mul(n.weight).min(MAX_WEIGHT),
                    drain: !n.healthy,
                })
            } else if e.terminating > 0 {
                // Its pods are going: keep the node's flows, send it no new ones.
                Some(Backend {
                    addr,
                    mac: None,
                    weight: n.weight.max(1),
                    drain: true,
                })
            } else {
                None
            }
        })
        .collect();
    backends.sort_by_key(|b| b.addr);
    backends
}

/// Endpoints of `address_type` (`IPv4` or `IPv6`) in a Service's `slices` serving port
/// `port_name`, counted per node. One endpoint listed in two slices (the controller moving it)
/// counts once.
fn local_endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    address_type: &str,
) -> BTreeMap<String, LocalEndpoints> {
    let mut seen = BTreeSet::new();
    let mut per_node: BTreeMap<String, LocalEndpoints> = BTreeMap::new();
    let mut slices: Vec<&EndpointSlice> = slices
        .iter()
        .copied()
        .filter(|s| s.address_type == address_type)
        .filter(|s| match s.ports.as_deref() {
            // No ports: the slice's endpoints serve every port of the Service.
            None | Some([]) => true,
            Some(ports) => ports
                .iter()
                .any(|p| p.name.as_deref().unwrap_or("") == port_name),
        })
        .collect();
    slices.sort_by_key(|s| s.metadata.name.clone());
    for slice in slices {
        for ep in slice.endpoints.iter().flatten() {
            let Some(node) = ep.node_name.as_ref() else {
                continue;
            };
            let Some(first) = ep.addresses.first() else {
                continue;
            };
            if !seen.insert(first.clone()) {
                continue;
            }
            // The API's rules: ready unset means ready; serving unset means as ready;
            // terminating unset means not terminating.
            let cond = ep.conditions.as_ref();
            let ready = cond.and_then(|c| c.ready).unwrap_or(true);
            let serving = cond.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = cond.and_then(|c| c.terminating).unwrap_or(false);
            let counts = per_node.entry(node.clone()).or_default();
            if ready && !terminating {
                counts.ready += 1;
            } else if serving && terminating {
                counts.terminating += 1;
            }
        }
    }
    per_node
}

/// One change between two builds: the Service ("namespace/name"), the VIP and, when it is
/// about one backend, the node it concerns; displayed as the line the agent logs at info.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub service: String,
    pub vip: VipAddr,
    pub node: Option<String>,
    pub line: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.line)
    }
}

/// The VIPs (Service, key) whose list went from one list to another, and that change's
/// (node, line) pairs.
type Moved = (Vec<(String, VipAddr)>, Vec<(String, String)>);

/// Beyond this many backends, an added VIP's line gives their count, not the list.
const LISTED_BACKENDS: usize = 8;
/// Beyond this many VIPs with the same change of their shared list, one line per change
/// counts them (a node joining 10,000 VIPs is one line, not 10,000).
const LISTED_VIPS: usize = 3;

/// One [`Change`] per change between two builds, naming the Service and the node: what the
/// agent logs at info, once per change. A list shared by many VIPs is compared once.
pub fn changes(old: &Built, new: &Built) -> Vec<Change> {
    let change = |service: &str, vip: &VipAddr, node: Option<String>, line: String| Change {
        service: service.to_owned(),
        vip: *vip,
        node,
        line: format!("service {service}: VIP {vip}{line}"),
    };
    // Removals first, then the rest in the new model's order.
    let mut out = Vec::new();
    let mut rest = Vec::new();
    // VIPs whose list changed, by (old list, new list): each pair is compared once.
    let mut moved: BTreeMap<(ListId, ListId), Moved> = BTreeMap::new();
    // Both models' VIPs are sorted by key: one merge walk pairs them (no lookup per VIP).
    let (mut olds, mut news) = (
        old.desired.vips.iter().peekable(),
        new.desired.vips.iter().peekable(),
    );
    loop {
        let (before, vip) = match (olds.peek(), news.peek()) {
            (None, None) => break,
            (Some(o), n) if n.is_none_or(|n| o.key < n.key) => {
                out.push(change(
                    owner(old, &o.key),
                    &o.key,
                    None,
                    " removed".to_owned(),
                ));
                olds.next();
                continue;
            }
            (Some(o), Some(n)) if o.key == n.key => (olds.next(), news.next()),
            _ => (None, news.next()),
        };
        let Some(vip) = vip else { break };
        let source = new.sources.get(&vip.key);
        let who = source.map_or("", |s| &*s.service);
        let Some(before) = before else {
            let listed = if vip.backends.len() <= LISTED_BACKENDS {
                let list: Vec<String> = vip.backends.iter().map(|b| show(new, b)).collect();
                format!(" [{}]", list.join(", "))
            } else {
                String::new()
            };
            rest.push(change(
                who,
                &vip.key,
                None,
                format!(" added with {} backends{listed}", vip.backends.len()),
            ));
            continue;
        };
        let was = old.sources.get(&vip.key);
        if was.map_or("", |s| &*s.service) != who {
            rest.push(change(who, &vip.key, None, " taken over".to_owned()));
        }
        if was.map(|s| &s.options) != source.map(|s| &s.options) {
            rest.push(change(who, &vip.key, None, " options changed".to_owned()));
        }
        if before.backends.same(&vip.backends) {
            continue;
        }
        moved
            .entry((before.backends.id(), vip.backends.id()))
            .or_insert_with(|| {
                (
                    Vec::new(),
                    list_changes(old, new, &before.backends, &vip.backends),
                )
            })
            .0
            .push((who.to_owned(), vip.key));
    }
    out.append(&mut rest);
    // In the order of the new model's VIPs.
    let mut moved: Vec<_> = moved.into_values().collect();
    moved.sort_by_key(|(vips, _)| vips[0].1);
    for (vips, lines) in moved {
        if vips.len() <= LISTED_VIPS {
            for (who, key) in &vips {
                for (node, line) in &lines {
                    out.push(change(who, key, Some(node.clone()), line.clone()));
                }
            }
        } else {
            let (who, key) = &vips[0];
            let others = format!(" and {} more VIPs", vips.len() - 1);
            for (node, line) in &lines {
                out.push(change(
                    who,
                    key,
                    Some(node.clone()),
                    format!("{others}{line}"),
                ));
            }
        }
    }
    out
}

/// The Service ("namespace/name") a VIP of `built` comes from ("" when unknown).
fn owner<'a>(built: &'a Built, key: &VipAddr) -> &'a str {
    built.sources.get(key).map_or("", |s| &*s.service)
}

fn node_name(built: &Built, b: &Backend) -> String {
    built
        .node_names
        .get(&b.addr)
        .cloned()
        .unwrap_or_else(|| "?".to_owned())
}

fn show(built: &Built, b: &Backend) -> String {
    let state = if b.drain { "draining" } else { "active" };
    format!(
        "node {} ({}) {state} weight {}",
        node_name(built, b),
        b.addr,
        b.weight
    )
}

/// (node, line) per backend added, removed or changed from `before` to `after` (both sorted
/// by address: one merge walk).
fn list_changes(
    old: &Built,
    new: &Built,
    before: &[Backend],
    after: &[Backend],
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < before.len() || j < after.len() {
        let (o, n) = (before.get(i), after.get(j));
        match (o, n) {
            (Some(o), Some(n)) if o.addr == n.addr => {
                if o != n {
                    out.push((
                        node_name(new, n),
                        format!(
                            ": {} (was {} weight {})",
                            show(new, n),
                            if o.drain { "draining" } else { "active" },
                            o.weight
                        ),
                    ));
                }
                i += 1;
                j += 1;
            }
            (Some(o), n) if n.is_none_or(|n| o.addr < n.addr) => {
                out.push((node_name(old, o), format!(": {} removed", show(old, o))));
                i += 1;
            }
            (_, Some(n)) => {
                out.push((node_name(new, n), format!(": {} added", show(new, n))));
                j += 1;
            }
            (_, None) => i += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn svc(ns: &str, name: &str, spec: Value, ingress: &[&str]) -> Arc<Service> {
        let ingress: Vec<Value> = ingress.iter().map(|ip| json!({"ip": ip})).collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns},
                "spec": spec,
                "status": {"loadBalancer": {"ingress": ingress}},
            }))
            .expect("service"),
        )
    }

    fn lb(ports: Value, policy: &str) -> Value {
        json!({"type": "LoadBalancer", "ports": ports, "externalTrafficPolicy": policy})
    }

    fn http() -> Value {
        json!([{"name": "http", "port": 80, "protocol": "TCP"}])
    }

    fn node(
        name: &str,
        ip: &str,
        ready: bool,
        unschedulable: bool,
        weight: Option<&str>,
    ) -> Arc<Node> {
        let mut annotations = serde_json::Map::new();
        if let Some(w) = weight {
            annotations.insert("sluice.io/weight".into(), json!(w));
        }
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": annotations},
                "spec": {"unschedulable": unschedulable},
                "status": {
                    "addresses": [{"type": "Hostname", "address": name},
                                  {"type": "InternalIP", "address": ip}],
                    "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}],
                },
            }))
            .expect("node"),
        )
    }

    /// (node, ip, ready, serving, terminating)
    type Ep<'a> = (&'a str, &'a str, Option<bool>, Option<bool>, Option<bool>);

    fn slice(
        ns: &str,
        svc: &str,
        name: &str,
        port_name: Option<&str>,
        eps: &[Ep],
    ) -> Arc<EndpointSlice> {
        let endpoints: Vec<Value> = eps
            .iter()
            .map(|(node, ip, ready, serving, terminating)| {
                json!({"addresses": [ip], "nodeName": node,
                       "conditions": {"ready": ready, "serving": serving, "terminating": terminating}})
            })
            .collect();
        let ports = match port_name {
            Some(p) => json!([{"name": p, "port": 8080, "protocol": "TCP"}]),
            None => json!(null),
        };
        // As the controller writes them: one family per slice, told by its addresses.
        let address_type = match eps.first().map(|e| e.1.parse::<IpAddr>()) {
            Some(Ok(IpAddr::V6(_))) => "IPv6",
            _ => "IPv4",
        };
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": ns,
                             "labels": {SERVICE_NAME_LABEL: svc}},
                "addressType": address_type,
                "endpoints": endpoints,
                "ports": ports,
            }))
            .expect("slice"),
        )
    }

    fn nodes3() -> Vec<Arc<Node>> {
        vec![
            node("n1", "10.0.0.1", true, false, None),
            node("n2", "10.0.0.2", true, false, None),
            node("n3", "10.0.0.3", true, false, None),
        ]
    }

    fn ready<'a>(node: &'a str, ip: &'a str) -> Ep<'a> {
        (node, ip, Some(true), Some(true), Some(false))
    }

    fn run(services: &[Arc<Service>], slices: &[Arc<EndpointSlice>], nodes: &[Arc<Node>]) -> Built {
        build(
            services,
            slices,
            nodes,
            Settings::default(),
            &AddressPolicy::default(),
        )
    }

    /// (address, weight, drain) of one VIP's backends.
    fn backends(b: &Built, key: &str) -> Vec<(String, u32, bool)> {
        b.desired
            .vip(&key.parse().unwrap())
            .unwrap_or_else(|| panic!("no VIP {key} in {:?}", b.desired.vips))
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight, b.drain))
            .collect()
    }

    fn bk(addr: &str, weight: u32, drain: bool) -> (String, u32, bool) {
        (addr.to_owned(), weight, drain)
    }

    /// `node.kubernetes.io/exclude-from-external-load-balancers` drains the node as a backend
    /// (its flows stay, no new ones), whatever its value, beside nodes without the label.
    #[test]
    fn a_node_excluded_from_external_load_balancers_drains() {
        let mut excluded = (*node("n2", "10.0.0.2", true, false, None)).clone();
        excluded.metadata.labels = Some(
            [(
                crate::node_state::EXCLUDE_LABEL.to_owned(),
                "true".to_owned(),
            )]
            .into_iter()
            .collect(),
        );
        let nodes = vec![
            node("n1", "10.0.0.1", true, false, None),
            Arc::new(excluded),
        ];
        let b = run(
            &[svc(
                "default",
                "web",
                lb(http(), "Cluster"),
                &["192.0.2.10"],
            )],
            &[],
            &nodes,
        );
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 1, false), bk("10.0.0.2", 1, true)]
        );
    }

    #[test]
    fn cluster_policy_uses_every_node_with_its_health() {
        let nodes = vec![
            node("n1", "10.0.0.1", true, false, None),
            node("n2", "10.0.0.2", false, false, None),
            node("n3", "10.0.0.3", true, true, None),
            node("n4", "10.0.0.4", true, false, Some("5")),
        ];
        let b = run(
            &[svc(
                "default",
                "web",
                lb(http(), "Cluster"),
                &["192.0.2.10"],
            )],
            &[],
            &nodes,
        );
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [
                bk("10.0.0.1", 1, false),
                bk("10.0.0.2", 1, true),
                bk("10.0.0.3", 1, true),
                bk("10.0.0.4", 5, false)
            ]
        );
        assert!(b.desired.vips[0].backends.iter().all(|b| b.mac.is_none()));
        assert_eq!(
            &*b.sources[&"192.0.2.10:80/tcp".parse().unwrap()].service,
            "default/web"
        );
        assert!(b.problems.is_empty(), "{:?}", b.problems);
    }

    #[test]
    fn policy_defaults_to_cluster() {
        let s = svc(
            "default",
            "web",
            json!({"type": "LoadBalancer", "ports": http()}),
            &["192.0.2.10"],
        );
        let b = run(&[s], &[], &nodes3());
        assert_eq!(backends(&b, "192.0.2.10:80/tcp").len(), 3);
    }

    #[test]
    fn a_vip_per_address_port_and_protocol() {
        let ports =
            json!([{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]);
        let mut spec = lb(ports, "Cluster");
        spec["externalIPs"] = json!(["198.51.100.7", "2001:db8::1"]);
        let b = run(
            &[svc("default", "web", spec, &["192.0.2.10", "2001:db8::2"])],
            &[],
            &nodes3(),
        );
        let keys: Vec<String> = b.desired.vips.iter().map(|v| v.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "192.0.2.10:53/udp",
                "192.0.2.10:80/tcp",
                "198.51.100.7:53/udp",
                "198.51.100.7:80/tcp",
                "[2001:db8::1]:53/udp",
                "[2001:db8::1]:80/tcp",
                "[2001:db8::2]:53/udp",
                "[2001:db8::2]:80/tcp"
            ]
        );
        // IPv4-only nodes and mode l2: the IPv6 VIPs exist, without backends, and say why.
        assert!(backends(&b, "[2001:db8::2]:80/tcp").is_empty());
        assert_eq!(b.problems.len(), 3, "{:?}", b.problems);
        assert!(
            b.problems.iter().all(
                |p| p.contains("has no IPv6 InternalIP, which mode l2 needs for the IPv6 VIPs")
            )
        );
    }

    /// A node with an InternalIP of each family.
    fn node_dual(name: &str, v4: &str, v6: &str) -> Arc<Node> {
        let mut n = Arc::unwrap_or_clone(node(name, v4, true, false, None));
        if let Some(addrs) = n.status.as_mut().and_then(|s| s.addresses.as_mut()) {
            addrs.push(
                serde_json::from_value(json!({"type": "InternalIP", "address": v6})).unwrap(),
            );
        }
        Arc::new(n)
    }

    #[test]
    fn dual_stack_service_gets_vips_of_both_families_with_backends_of_each() {
        let nodes = vec![
            node_dual("n1", "10.0.0.1", "fd00::1"),
            node_dual("n2", "10.0.0.2", "fd00::2"),
            node("n3", "10.0.0.3", true, false, None),
            node("n4", "fd00::4", true, false, None),
        ];
        let mut spec = lb(http(), "Cluster");
        spec["ipFamilies"] = json!(["IPv4", "IPv6"]);
        spec["ipFamilyPolicy"] = json!("RequireDualStack");
        spec["loadBalancerSourceRanges"] = json!(["192.0.2.0/24", "2001:db8:1::/48"]);
        let web = svc(
            "default",
            "web",
            spec.clone(),
            &["192.0.2.10", "2001:db8::10"],
        );
        let b = run(&[web], &[], &nodes);
        // Mode l2: each VIP by its own family only; the other family's nodes are named.
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [
                bk("10.0.0.1", 1, false),
                bk("10.0.0.2", 1, false),
                bk("10.0.0.3", 1, false)
            ]
        );
        assert_eq!(
            backends(&b, "[2001:db8::10]:80/tcp"),
            [
                bk("fd00::1", 1, false),
                bk("fd00::2", 1, false),
                bk("fd00::4", 1, false)
            ]
        );
        let p: Vec<&str> = b.problems.iter().map(String::as_str).collect();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p.iter()
                .any(|p| p.contains("node n3 has no IPv6 InternalIP"))
        );
        assert!(
            p.iter()
                .any(|p| p.contains("node n4 has no IPv4 InternalIP"))
        );
        // Source ranges of both families travel with both VIPs (each admits its own family).
        for key in ["192.0.2.10:80/tcp", "[2001:db8::10]:80/tcp"] {
            let vip = b
                .desired
                .vips
                .iter()
                .find(|v| v.key.to_string() == key)
                .unwrap();
            let ranges: Vec<String> = vip.source_ranges.iter().map(ToString::to_string).collect();
            assert_eq!(ranges, ["192.0.2.0/24", "2001:db8:1::/48"], "{key}");
        }
        // Every address of every node is a peer and names its node.
        assert_eq!(b.desired.peers.len(), 6);
        assert_eq!(b.node_names[&"fd00::2".parse::<IpAddr>().unwrap()], "n2");

        // Mode ipip: a node of the other family only is reached across families.
        let mut ipip =
            Arc::unwrap_or_clone(svc("default", "web", spec, &["192.0.2.10", "2001:db8::10"]));
        ipip.metadata.annotations = Some(BTreeMap::from([(
            "sluice.io/forwarding-mode".to_owned(),
            "ipip".to_owned(),
        )]));
        let b = run(&[Arc::new(ipip)], &[], &nodes);
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [
                bk("10.0.0.1", 1, false),
                bk("10.0.0.2", 1, false),
                bk("10.0.0.3", 1, false),
                bk("fd00::4", 1, false)
            ]
        );
        assert_eq!(
            backends(&b, "[2001:db8::10]:80/tcp"),
            [
                bk("10.0.0.3", 1, false),
                bk("fd00::1", 1, false),
                bk("fd00::2", 1, false),
                bk("fd00::4", 1, false)
            ]
        );
        assert!(b.problems.is_empty(), "{:?}", b.problems);
    }

    #[test]
    fn local_policy_on_ipv6_vips_uses_the_nodes_ipv6_addresses() {
        let nodes = vec![
            node_dual("n1", "10.0.0.1", "fd00::1"),
            node_dual("n2", "10.0.0.2", "fd00::2"),
        ];
        let web = svc("default", "web", lb(http(), "Local"), &["2001:db8::10"]);
        let slices = [slice(
            "default",
            "web",
            "web-1",
            Some("http"),
            &[ready("n2", "fd01::5"), ready("n2", "fd01::6")],
        )];
        let b = run(&[web], &slices, &nodes);
        assert_eq!(
            backends(&b, "[2001:db8::10]:80/tcp"),
            [bk("fd00::2", 2, false)]
        );
    }

    #[test]
    fn local_policy_counts_a_dual_stack_pod_once_per_family() {
        let nodes = vec![
            node_dual("n1", "10.0.0.1", "fd00::1"),
            node_dual("n2", "10.0.0.2", "fd00::2"),
        ];
        let web = svc(
            "default",
            "web",
            lb(http(), "Local"),
            &["192.0.2.10", "2001:db8::10"],
        );
        // Dual-stack pods on n1 (two) and n2 (one), in one slice per family; and an
        // IPv4-only pod on n2 that kube-proxy's IPv6 side cannot reach.
        let slices = [
            slice(
                "default",
                "web",
                "web-v4",
                Some("http"),
                &[
                    ready("n1", "10.1.0.5"),
                    ready("n1", "10.1.0.6"),
                    ready("n2", "10.2.0.5"),
                    ready("n2", "10.2.0.6"),
                ],
            ),
            slice(
                "default",
                "web",
                "web-v6",
                Some("http"),
                &[
                    ready("n1", "fd01::5"),
                    ready("n1", "fd01::6"),
                    ready("n2", "fd02::5"),
                ],
            ),
        ];
        let b = run(&[web], &slices, &nodes);
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 2, false), bk("10.0.0.2", 2, false)]
        );
        assert_eq!(
            backends(&b, "[2001:db8::10]:80/tcp"),
            [bk("fd00::1", 2, false), bk("fd00::2", 1, false)]
        );
    }

    #[test]
    fn no_address_no_vip_and_other_types_ignored() {
        let pending = svc("default", "pending", lb(http(), "Cluster"), &[]);
        let ext = svc(
            "default",
            "ext",
            json!({"type": "ExternalName", "externalName": "x.example"}),
            &[],
        );
        let b = run(&[pending, ext], &[], &nodes3());
        assert!(b.desired.vips.is_empty());
        assert!(b.problems.is_empty());
    }

    #[test]
    fn external_ips_of_a_cluster_ip_service_are_vips() {
        let spec = json!({"type": "ClusterIP", "ports": http(), "externalIPs": ["198.51.100.7"]});
        let b = run(&[svc("default", "web", spec, &[])], &[], &nodes3());
        assert_eq!(backends(&b, "198.51.100.7:80/tcp").len(), 3);
    }

    #[test]
    fn local_policy_weights_nodes_by_ready_endpoints() {
        let s = svc("default", "web", lb(http(), "Local"), &["192.0.2.10"]);
        let slices = vec![
            slice(
                "default",
                "web",
                "web-a",
                Some("http"),
                &[
                    ready("n1", "10.1.0.1"),
                    ready("n1", "10.1.0.2"),
                    ready("n3", "10.1.0.3"),
                ],
            ),
            // Another Service's slice, and one in another namespace: not ours.
            slice(
                "default",
                "other",
                "other-a",
                Some("http"),
                &[ready("n2", "10.1.0.9")],
            ),
            slice(
                "prod",
                "web",
                "web-a",
                Some("http"),
                &[ready("n2", "10.1.0.8")],
            ),
        ];
        let b = run(&[s], &slices, &nodes3());
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 2, false), bk("10.0.0.3", 1, false)]
        );
    }

    #[test]
    fn local_weight_multiplies_node_weight_and_is_capped() {
        let nodes = vec![
            node("n1", "10.0.0.1", true, false, Some("5000")),
            node("n2", "10.0.0.2", true, false, Some("10000")),
        ];
        let s = svc("default", "web", lb(http(), "Local"), &["192.0.2.10"]);
        let slices = vec![slice(
            "default",
            "web",
            "web-a",
            None,
            &[
                ready("n1", "10.1.0.1"),
                ready("n1", "10.1.0.2"),
                ready("n2", "10.1.0.3"),
                ready("n2", "10.1.0.4"),
            ],
        )];
        let b = run(&[s], &slices, &nodes);
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 10_000, false), bk("10.0.0.2", 10_000, false)]
        );
    }

    #[test]
    fn local_terminating_endpoints_drain_their_node() {
        let s = svc("default", "web", lb(http(), "Local"), &["192.0.2.10"]);
        let slices = vec![slice(
            "default",
            "web",
            "web-a",
            Some("http"),
            &[
                ready("n1", "10.1.0.1"),
                // serving + terminating: drain
                ("n2", "10.1.0.2", Some(false), Some(true), Some(true)),
                // n1 has a ready one too: it stays active with weight 1
                ("n1", "10.1.0.4", Some(false), Some(true), Some(true)),
                // not serving, terminating: gone
                ("n3", "10.1.0.3", Some(false), Some(false), Some(true)),
            ],
        )];
        let b = run(&[s], &slices, &nodes3());
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 1, false), bk("10.0.0.2", 1, true)]
        );
    }

    #[test]
    fn local_unset_conditions_follow_the_api_defaults() {
        let s = svc("default", "web", lb(http(), "Local"), &["192.0.2.10"]);
        let slices = vec![slice(
            "default",
            "web",
            "web-a",
            Some("http"),
            &[
                ("n1", "10.1.0.1", None, None, None),
                ("n2", "10.1.0.2", Some(false), None, None),
            ],
        )];
        let b = run(&[s], &slices, &nodes3());
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 1, false)]
        );
    }

    #[test]
    fn local_ready_endpoint_on_an_unhealthy_node_drains() {
        let nodes = vec![
            node("n1", "10.0.0.1", false, false, None),
            node("n2", "10.0.0.2", true, true, None),
            node("n3", "10.0.0.3", true, false, None),
        ];
        let s = svc("default", "web", lb(http(), "Local"), &["192.0.2.10"]);
        let slices = vec![slice(
            "default",
            "web",
            "web-a",
            Some("http"),
            &[
                ready("n1", "10.1.0.1"),
                ready("n2", "10.1.0.2"),
                ready("n3", "10.1.0.3"),
                // a node the agent does not know: skipped
                ready("n9", "10.1.0.9"),
            ],
        )];
        let b = run(&[s], &slices, &nodes);
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [
                bk("10.0.0.1", 1, true),
                bk("10.0.0.2", 1, true),
                bk("10.0.0.3", 1, false)
            ]
        );
    }

    #[test]
    fn local_endpoints_count_once_and_per_port() {
        let ports = json!([{"name": "http", "port": 80}, {"name": "https", "port": 443}]);
        let s = svc("default", "web", lb(ports, "Local"), &["192.0.2.10"]);
        let slices = vec![
            slice(
                "default",
                "web",
                "web-a",
                Some("http"),
                &[ready("n1", "10.1.0.1"), ready("n2", "10.1.0.2")],
            ),
            // the same endpoint again while the controller moves it between slices
            slice(
                "default",
                "web",
                "web-b",
                Some("http"),
                &[ready("n1", "10.1.0.1")],
            ),
            slice(
                "default",
                "web",
                "web-c",
                Some("https"),
                &[ready("n3", "10.1.0.3")],
            ),
        ];
        let b = run(&[s], &slices, &nodes3());
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 1, false), bk("10.0.0.2", 1, false)]
        );
        assert_eq!(
            backends(&b, "192.0.2.10:443/tcp"),
            [bk("10.0.0.3", 1, false)]
        );
    }

    #[test]
    fn local_without_endpoints_has_a_vip_with_no_backends() {
        let b = run(
            &[svc("default", "web", lb(http(), "Local"), &["192.0.2.10"])],
            &[],
            &nodes3(),
        );
        assert!(backends(&b, "192.0.2.10:80/tcp").is_empty());
    }

    #[test]
    fn conflicting_services_first_by_name_wins_and_is_reported() {
        let a = svc("default", "a", lb(http(), "Cluster"), &["192.0.2.10"]);
        let z = svc("default", "z", lb(http(), "Local"), &["192.0.2.10"]);
        for order in [vec![a.clone(), z.clone()], vec![z.clone(), a.clone()]] {
            let b = run(&order, &[], &nodes3());
            assert_eq!(
                &*b.sources[&"192.0.2.10:80/tcp".parse().unwrap()].service,
                "default/a"
            );
            assert_eq!(backends(&b, "192.0.2.10:80/tcp").len(), 3);
            let problems: Vec<&String> = b.problems.iter().collect();
            assert_eq!(
                problems,
                ["service default/z: VIP 192.0.2.10:80/tcp is already served for default/a"]
            );
        }
    }

    #[test]
    fn invalid_options_skip_the_service_with_a_reason() {
        let mut s = (*svc("default", "web", lb(http(), "Cluster"), &["192.0.2.10"])).clone();
        s.metadata.annotations =
            Some([("sluice.io/forwarding-mode".to_owned(), "vxlan".to_owned())].into());
        let good = svc("default", "ok", lb(http(), "Cluster"), &["192.0.2.11"]);
        let b = run(&[Arc::new(s), good], &[], &nodes3());
        let keys: Vec<String> = b.desired.vips.iter().map(|v| v.key.to_string()).collect();
        assert_eq!(keys, ["192.0.2.11:80/tcp"]);
        let p = b.problems.iter().next().unwrap();
        assert!(
            p.starts_with("service default/web: annotation sluice.io/forwarding-mode"),
            "{p}"
        );
    }

    /// Issue 25 item 5: a node that annotates its own Node with weight 10,000 among equals
    /// keeps 8 times the median, and the problem names it.
    #[test]
    fn a_node_weight_of_ten_thousand_is_capped_and_reported() {
        let mut nodes = nodes3();
        nodes.push(node("greedy", "10.0.0.9", true, false, Some("10000")));
        let b = run(
            &[svc(
                "default",
                "web",
                lb(http(), "Cluster"),
                &["192.0.2.10"],
            )],
            &[],
            &nodes,
        );
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [
                bk("10.0.0.1", 1, false),
                bk("10.0.0.2", 1, false),
                bk("10.0.0.3", 1, false),
                bk("10.0.0.9", 8, false)
            ]
        );
        let p: Vec<&String> = b.problems.iter().collect();
        assert_eq!(
            p,
            [
                "node greedy: annotation sluice.io/weight 10000 is over 8 times the median node weight (1): using 8"
            ]
        );
    }

    /// Issue 25 item 4: a Service owner may not annotate a probe that waits longer than its
    /// interval (a silent port would then hold a probe permit for ever longer).
    #[test]
    fn a_health_check_timeout_over_its_interval_is_refused_naming_service_and_annotation() {
        let mut s = (*svc("shop", "web", lb(http(), "Cluster"), &["192.0.2.10"])).clone();
        s.metadata.annotations = Some(
            [(
                "sluice.io/health-check".to_owned(),
                "tcp:8080 interval=1s timeout=300s".to_owned(),
            )]
            .into(),
        );
        let b = run(&[Arc::new(s)], &[], &nodes3());
        assert!(b.desired.vips.is_empty());
        let p = b.problems.iter().next().unwrap();
        assert!(
            p.starts_with("service shop/web: annotation sluice.io/health-check: timeout: 300s")
                && p.contains("at most the interval (1s)"),
            "{p}"
        );
    }

    #[test]
    fn options_travel_with_the_vip() {
        let mut spec = lb(http(), "Cluster");
        spec["sessionAffinity"] = json!("ClientIP");
        spec["loadBalancerSourceRanges"] = json!(["203.0.113.0/24"]);
        let b = run(
            &[svc("default", "web", spec, &["192.0.2.10"])],
            &[],
            &nodes3(),
        );
        let o = &b.sources[&"192.0.2.10:80/tcp".parse().unwrap()].options;
        assert!(o.client_affinity);
        assert_eq!(o.source_ranges.len(), 1);
    }

    #[test]
    fn bad_nodes_and_protocols_are_reported_not_fatal() {
        let mut nodes = nodes3();
        nodes.push(Arc::new(
            serde_json::from_value(json!({"metadata": {"name": "n0"}})).unwrap(),
        ));
        nodes.push(node("n4", "10.0.0.1", true, false, None));
        nodes.push(node("n5", "10.0.0.5", true, false, Some("lots")));
        let ports = json!([{"port": 80}, {"port": 9, "protocol": "SCTP"}]);
        let mut spec = lb(ports, "Cluster");
        spec["externalIPs"] = json!(["not-an-ip"]);
        let b = run(&[svc("default", "web", spec, &["192.0.2.10"])], &[], &nodes);
        assert_eq!(
            backends(&b, "192.0.2.10:80/tcp"),
            [
                bk("10.0.0.1", 1, false),
                bk("10.0.0.2", 1, false),
                bk("10.0.0.3", 1, false),
                bk("10.0.0.5", 1, false)
            ]
        );
        let p: Vec<&str> = b.problems.iter().map(String::as_str).collect();
        assert_eq!(p.len(), 5, "{p:?}");
        assert!(p.iter().any(|p| p.starts_with("node n0: no InternalIP")));
        assert!(
            p.iter()
                .any(|p| p.contains("n4: InternalIP 10.0.0.1 is also node n1's"))
        );
        assert!(
            p.iter()
                .any(|p| p.starts_with("node n5: annotation sluice.io/weight"))
        );
        assert!(p.iter().any(|p| p.contains("protocol SCTP")));
        assert!(
            p.iter()
                .any(|p| p.contains("\"not-an-ip\" is not an IPv4 or IPv6 address"))
        );
    }

    #[test]
    fn same_objects_in_any_order_build_the_same_model() {
        let services = vec![
            svc("default", "web", lb(http(), "Local"), &["192.0.2.10"]),
            svc("default", "api", lb(http(), "Cluster"), &["192.0.2.11"]),
        ];
        let slices = vec![
            slice(
                "default",
                "web",
                "web-a",
                Some("http"),
                &[ready("n1", "10.1.0.1")],
            ),
            slice(
                "default",
                "web",
                "web-b",
                Some("http"),
                &[ready("n2", "10.1.0.2")],
            ),
        ];
        let nodes = nodes3();
        let a = run(&services, &slices, &nodes);
        fn rev<T>(v: &[Arc<T>]) -> Vec<Arc<T>> {
            v.iter().rev().cloned().collect()
        }
        let b = run(&rev(&services), &rev(&slices), &rev(&nodes));
        assert_eq!(a, b);
    }

    #[test]
    fn changes_name_the_service_node_and_state() {
        let s = svc("shop", "web", lb(http(), "Local"), &["192.0.2.10"]);
        let before = run(
            std::slice::from_ref(&s),
            &[slice(
                "shop",
                "web",
                "a",
                Some("http"),
                &[ready("n1", "10.1.0.1"), ready("n2", "10.1.0.2")],
            )],
            &nodes3(),
        );
        let after = run(
            std::slice::from_ref(&s),
            &[slice(
                "shop",
                "web",
                "a",
                Some("http"),
                &[
                    ready("n1", "10.1.0.1"),
                    ready("n1", "10.1.0.5"),
                    ("n2", "10.1.0.2", Some(false), Some(true), Some(true)),
                    ready("n3", "10.1.0.3"),
                ],
            )],
            &nodes3(),
        );
        let lines: Vec<String> = changes(&before, &after)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "service shop/web: VIP 192.0.2.10:80/tcp: node n1 (10.0.0.1) active weight 2 (was active weight 1)",
                "service shop/web: VIP 192.0.2.10:80/tcp: node n2 (10.0.0.2) draining weight 1 (was active weight 1)",
                "service shop/web: VIP 192.0.2.10:80/tcp: node n3 (10.0.0.3) active weight 1 added",
            ]
        );
        assert!(changes(&after, &after).is_empty());
        let added = changes(&Built::default(), &before);
        assert_eq!(added.len(), 1);
        assert_eq!(added[0].service, "shop/web");
        assert_eq!(added[0].node, None);
        assert!(
            added[0].line.starts_with(
                "service shop/web: VIP 192.0.2.10:80/tcp added with 2 backends [node n1"
            ),
            "{added:?}"
        );
        assert_eq!(
            changes(&before, &Built::default())
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["service shop/web: VIP 192.0.2.10:80/tcp removed"]
        );
        let first = &changes(&before, &after)[0];
        assert_eq!(
            (first.vip.to_string(), first.node.as_deref()),
            ("192.0.2.10:80/tcp".to_owned(), Some("n1"))
        );
    }

    #[test]
    fn a_node_joining_many_vips_is_one_line_and_their_list_is_shared() {
        let services: Vec<Arc<Service>> = (0..5)
            .map(|i| {
                svc(
                    "shop",
                    &format!("web{i}"),
                    lb(http(), "Cluster"),
                    &[&format!("192.0.2.{}", 10 + i)],
                )
            })
            .collect();
        let before = run(&services, &[], &nodes3());
        // One list for every Cluster VIP of the family.
        let first = &before.desired.vips[0].backends;
        assert!(before.desired.vips.iter().all(|v| v.backends.same(first)));
        let mut four = nodes3();
        four.push(node("n4", "10.0.0.4", true, false, None));
        let mut after = run(&services, &[], &four);
        after.desired.share_backends_with(&before.desired);
        let lines: Vec<String> = changes(&before, &after)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            lines,
            [
                "service shop/web0: VIP 192.0.2.10:80/tcp and 4 more VIPs: node n4 (10.0.0.4) active weight 1 added"
            ]
        );
        // The same nodes again: every list is the last model's own.
        let mut again = run(&services, &[], &four);
        again.desired.share_backends_with(&after.desired);
        assert!(
            again
                .desired
                .vips
                .iter()
                .zip(&after.desired.vips)
                .all(|(a, b)| a.backends.same(&b.backends))
        );
        assert!(changes(&after, &again).is_empty());
        // Many backends: an added VIP's line counts them.
        let many: Vec<Arc<Node>> = (1..=9)
            .map(|i| node(&format!("n{i}"), &format!("10.0.0.{i}"), true, false, None))
            .collect();
        let added = changes(&Built::default(), &run(&services[..1], &[], &many));
        assert_eq!(
            added[0].line,
            "service shop/web0: VIP 192.0.2.10:80/tcp added with 9 backends"
        );
    }

    /// `obj` as read from the API: with a resource version.
    fn at_version<T: kube::Resource + Clone>(obj: &Arc<T>, version: &str) -> Arc<T> {
        let mut obj = (**obj).clone();
        obj.meta_mut().resource_version = Some(version.to_owned());
        Arc::new(obj)
    }

    #[test]
    fn a_slice_change_rebuilds_its_service_alone() {
        let services: Vec<Arc<Service>> = ["a", "b"]
            .iter()
            .enumerate()
            .map(|(i, n)| {
                at_version(
                    &svc(
                        "shop",
                        n,
                        lb(http(), "Local"),
                        &[&format!("192.0.2.{}", 10 + i)],
                    ),
                    "1",
                )
            })
            .collect();
        let slices = |b_ready: &[Ep], b_version: &str| {
            vec![
                at_version(
                    &slice("shop", "a", "a1", Some("http"), &[ready("n1", "10.1.0.1")]),
                    "1",
                ),
                at_version(&slice("shop", "b", "b1", Some("http"), b_ready), b_version),
            ]
        };
        let mut cache = BuildCache::default();
        let policy = AddressPolicy::default();
        let mut build_at = |slices: &[Arc<EndpointSlice>], nodes: &[Arc<Node>]| {
            build_with(
                &mut cache,
                &services,
                slices,
                nodes,
                Settings::default(),
                &policy,
            )
        };
        let first = build_at(&slices(&[ready("n1", "10.1.0.2")], "1"), &nodes3());
        // b's slice moves to n2: b is rebuilt, a is the last build's.
        let second = build_at(&slices(&[ready("n2", "10.1.0.2")], "2"), &nodes3());
        let (a1, b1) = (&first.desired.vips[0], &first.desired.vips[1]);
        let (a2, b2) = (&second.desired.vips[0], &second.desired.vips[1]);
        assert!(a2.backends.same(&a1.backends), "a reused");
        assert_eq!(
            backends(&second, "192.0.2.11:80/tcp"),
            [bk("10.0.0.2", 1, false)]
        );
        assert!(!b2.backends.same(&b1.backends));
        // The same objects again: both reused.
        let third = build_at(&slices(&[ready("n2", "10.1.0.2")], "2"), &nodes3());
        assert!(third.desired.vips[1].backends.same(&b2.backends));
        // Another node set: everything is rebuilt (a's node n1 now drains).
        let mut nodes = nodes3();
        nodes[0] = node("n1", "10.0.0.1", true, true, None);
        let fourth = build_at(&slices(&[ready("n2", "10.1.0.2")], "2"), &nodes);
        assert_eq!(
            backends(&fourth, "192.0.2.10:80/tcp"),
            [bk("10.0.0.1", 1, true)]
        );
        // Whatever was reused, the model is the one a fresh build makes.
        assert_eq!(
            fourth,
            run(&services, &slices(&[ready("n2", "10.1.0.2")], "2"), &nodes)
        );
    }
}
