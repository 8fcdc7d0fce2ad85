//! The allocation: which Service holds which pool address. A pure function of the pools and
//! the Services (their status included), so that it keeps no state of its own: after a restart
//! or a leader change it is rebuilt from what the API holds, and every agent computes the same
//! answer (the allocator writes it; every agent serves only what it says).
//!
//! Services are taken oldest first (creation time, then uid), so in any conflict the older
//! keeps the address and the younger gets an Event: never the name's order.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::pools::{Pool, Pools, addr};

/// IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(a: IpAddr) -> Family {
        if a.is_ipv4() { Family::V4 } else { Family::V6 }
    }
}

/// A port a Service exposes, for the sharing rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PortProto {
    pub port: u16,
    /// "TCP", "UDP", "SCTP".
    pub protocol: &'static str,
}

/// What the allocator needs to know of one Service.
#[derive(Clone, Debug, Default)]
pub struct Claim {
    /// namespace/name.
    pub key: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// creationTimestamp (RFC 3339) and uid: the age order.
    pub created: String,
    pub uid: String,
    /// `type: LoadBalancer` of sluice's class: it gets pool addresses.
    pub load_balancer: bool,
    /// Families it asks for, primary first (`ipFamilies`; one unless dual-stack).
    pub families: Vec<Family>,
    /// `ipFamilyPolicy: RequireDualStack`: every family or none.
    pub require_all: bool,
    /// Addresses asked for (annotation, or `spec.loadBalancerIP`).
    pub requested: Vec<IpAddr>,
    /// Services with the same key may share an address.
    pub sharing_key: Option<String>,
    pub ports: Vec<PortProto>,
    /// `externalTrafficPolicy: Local` (sharing needs the same policy).
    pub local_policy: bool,
    /// `status.loadBalancer.ingress` as the API holds it now.
    pub current: Vec<IpAddr>,
    /// `spec.externalIPs`.
    pub external_ips: Vec<IpAddr>,
}

/// An Event for a Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Notice {
    pub service: String,
    pub warning: bool,
    /// CamelCase, as Kubernetes Events have it.
    pub reason: &'static str,
    pub message: String,
}

/// The allocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    /// Per load-balancer Service: the addresses its status should hold (maybe none).
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// Per Service: the `spec.externalIPs` that are served (inside a pool that allows them).
    pub external_ips: BTreeMap<String, Vec<IpAddr>>,
    pub notices: Vec<Notice>,
}

impl Allocation {
    /// The addresses `key` may be served on: its allocated addresses that its status already
    /// shows (an address is announced once the Service says so), and its allowed externalIPs.
    pub fn served(&self, key: &str, status: &[IpAddr]) -> Vec<IpAddr> {
        let mut v: Vec<IpAddr> = self
            .addresses
            .get(key)
            .into_iter()
            .flatten()
            .filter(|a| status.contains(a))
            .chain(self.external_ips.get(key).into_iter().flatten())
            .copied()
            .collect();
        v.sort();
        v.dedup();
        v
    }
}

/// Who uses an address so far.
struct User<'a> {
    key: &'a str,
    sharing_key: Option<&'a str>,
    local_policy: bool,
    ports: &'a [PortProto],
}

#[derive(Default)]
struct Taken<'a>(BTreeMap<IpAddr, Vec<User<'a>>>);

impl<'a> Taken<'a> {
    /// Whether `c` may use `a` beside its users; the reason when not.
    fn compatible(&self, a: IpAddr, c: &Claim) -> Result<(), String> {
        let Some(users) = self.0.get(&a) else {
            return Ok(());
        };
        for u in users {
            let shares = c.sharing_key.is_some() && u.sharing_key == c.sharing_key.as_deref();
            if !shares {
                return Err(format!("{a} is held by {} (no common sharing key)", u.key));
            }
            if u.local_policy != c.local_policy {
                return Err(format!(
                    "{a} is shared with {}, whose externalTrafficPolicy differs",
                    u.key
                ));
            }
            if let Some(p) = c.ports.iter().find(|p| u.ports.contains(p)) {
                return Err(format!(
                    "{a} is shared with {}, which has port {}/{} already",
                    u.key, p.port, p.protocol
                ));
            }
        }
        Ok(())
    }

    fn is_shared_by_key(&self, a: IpAddr, key: Option<&str>) -> bool {
        key.is_some()
            && self
                .0
                .get(&a)
                .is_some_and(|us| !us.is_empty() && us.iter().all(|u| u.sharing_key == key))
    }

    fn take(&mut self, a: IpAddr, c: &'a Claim) {
        self.0.entry(a).or_default().push(User {
            key: &c.key,
            sharing_key: c.sharing_key.as_deref(),
            local_policy: c.local_policy,
            ports: &c.ports,
        });
    }
}

/// Allocates pool addresses to `claims` (see the module doc).
pub fn allocate(pools: &Pools, claims: &[Claim]) -> Allocation {
    let mut order: Vec<&Claim> = claims.iter().collect();
    order.sort_by(|a, b| (&a.created, &a.uid, &a.key).cmp(&(&b.created, &b.uid, &b.key)));
    let mut taken = Taken::default();
    let mut out = Allocation::default();
    let mut notice = |c: &Claim, warning: bool, reason: &'static str, message: String| {
        out.notices.push(Notice {
            service: c.key.clone(),
            warning,
            reason,
            message,
        })
    };
    let mut addresses = BTreeMap::new();
    let mut external = BTreeMap::new();
    // Phase 1, oldest first: what Services hold (their status, while still allowed) and name
    // (externalIPs) stays theirs; in a conflict the older keeps it.
    let mut kept: BTreeMap<&str, Vec<IpAddr>> = BTreeMap::new();
    for &c in &order {
        // externalIPs first: the Service's owner named them, and they are checked like any.
        let mut ext = Vec::new();
        for &a in &c.external_ips {
            let why = match pools.pool_of(a) {
                None => Some(format!(
                    "externalIP {a} is outside every address pool: not served"
                )),
                Some(p) if !p.spec.allow_external_ips => Some(format!(
                    "externalIP {a} is in pool {}, which does not allow externalIPs: not served",
                    p.spec.name
                )),
                Some(p) if !p.serves(&c.namespace, &c.labels) => Some(format!(
                    "externalIP {a}: pool {} does not serve this Service: not served",
                    p.spec.name
                )),
                Some(_) => taken
                    .compatible(a, c)
                    .err()
                    .map(|e| format!("externalIP {e}: not served")),
            };
            match why {
                Some(m) => notice(c, true, "ExternalIPRefused", m),
                None => {
                    taken.take(a, c);
                    ext.push(a);
                }
            }
        }
        if !ext.is_empty() {
            external.insert(c.key.clone(), ext);
        }
        if c.load_balancer {
            let held = held_addresses(pools, &taken, c);
            for &a in &held {
                taken.take(a, c);
            }
            kept.insert(c.key.as_str(), held);
        }
    }
    // Phase 2, oldest first: new addresses from what is left (so a new Service never takes
    // an address a Service already holds, whatever their ages).
    for c in order.iter().filter(|c| c.load_balancer) {
        let held = kept.remove(c.key.as_str()).unwrap_or_default();
        let got = match complete(pools, &taken, c, &held) {
            Ok(new) => {
                for &a in &new {
                    taken.take(a, c);
                }
                held.into_iter().chain(new).collect()
            }
            Err(m) => {
                notice(c, true, "AllocationFailed", m);
                if c.require_all { Vec::new() } else { held }
            }
        };
        let mut now = got.clone();
        now.sort();
        let mut was = c.current.clone();
        was.sort();
        if now != was && !now.is_empty() {
            let list: Vec<String> = got.iter().map(IpAddr::to_string).collect();
            notice(
                c,
                false,
                "IPAllocated",
                format!("assigned {}", list.join(", ")),
            );
        }
        addresses.insert(c.key.clone(), got);
    }
    out.addresses = addresses;
    out.external_ips = external;
    out
}

/// Whether `c` may have `a` at all (pool, selector, the .0/.255 rule), and the pool.
fn eligible<'p>(pools: &'p Pools, c: &Claim, a: IpAddr) -> Result<&'p Pool, String> {
    let p = pools
        .pool_of(a)
        .ok_or_else(|| format!("{a} is outside every address pool"))?;
    if !p.serves(&c.namespace, &c.labels) {
        return Err(format!("pool {} does not serve this Service", p.spec.name));
    }
    if !p.usable(a) {
        return Err(format!(
            "pool {} avoids .0 and .255 addresses ({a})",
            p.spec.name
        ));
    }
    Ok(p)
}

/// The addresses of `c`'s status it keeps: still allowed, compatible with what older Services
/// hold, one per family it asks for (when it requests addresses: those of them it holds).
fn held_addresses(pools: &Pools, taken: &Taken<'_>, c: &Claim) -> Vec<IpAddr> {
    let mut held: Vec<IpAddr> = Vec::new();
    for &a in &c.current {
        let family = Family::of(a);
        // Requested addresses are kept as many as requested; otherwise one per family.
        let room = if c.requested.is_empty() {
            c.families.contains(&family) && !held.iter().any(|h| Family::of(*h) == family)
        } else {
            c.requested.contains(&a)
        };
        if room && eligible(pools, c, a).is_ok() && taken.compatible(a, c).is_ok() {
            held.push(a);
        }
    }
    held
}

/// The addresses `c` still needs beside `held`, or why it cannot have them.
fn complete(
    pools: &Pools,
    taken: &Taken<'_>,
    c: &Claim,
    held: &[IpAddr],
) -> Result<Vec<IpAddr>, String> {
    if !c.requested.is_empty() {
        // Requested: exactly those, or the reason.
        let mut new = Vec::new();
        for &a in c.requested.iter().filter(|a| !held.contains(a)) {
            eligible(pools, c, a).map_err(|e| format!("requested {a}: {e}"))?;
            taken
                .compatible(a, c)
                .map_err(|e| format!("requested {a}: {e}"))?;
            new.push(a);
        }
        return Ok(new);
    }
    let mut new = Vec::new();
    let mut missing = Vec::new();
    for &family in &c.families {
        if held.iter().any(|a| Family::of(*a) == family) {
            continue;
        }
        let shared = shared_address(taken, c, family)?.filter(|&a| eligible(pools, c, a).is_ok());
        match shared.or_else(|| pick(pools, taken, c, family)) {
            Some(a) => new.push(a),
            None => missing.push(family),
        }
    }
    if !missing.is_empty() && (c.require_all || held.len() + new.len() == 0) {
        let any_pool = pools
            .valid
            .iter()
            .any(|p| p.spec.auto_assign && p.serves(&c.namespace, &c.labels));
        let fam: Vec<&str> = missing
            .iter()
            .map(|f| if *f == Family::V4 { "IPv4" } else { "IPv6" })
            .collect();
        return Err(if any_pool {
            format!(
                "no free {} address in the pools that serve this Service (exhausted, or every candidate conflicts)",
                fam.join(" and ")
            )
        } else {
            format!(
                "no auto-assign pool of {} serves this Service",
                fam.join(" and ")
            )
        });
    }
    Ok(new)
}

/// The address a sharing key already uses in `family` (a key names one shared address per
/// family): `Ok(None)` when the key holds none yet, `Err` when `c` cannot join it (a port taken,
/// another traffic policy).
fn shared_address(taken: &Taken<'_>, c: &Claim, family: Family) -> Result<Option<IpAddr>, String> {
    let Some(key) = c.sharing_key.as_deref() else {
        return Ok(None);
    };
    let Some(&a) = taken
        .0
        .keys()
        .find(|&&a| Family::of(a) == family && taken.is_shared_by_key(a, Some(key)))
    else {
        return Ok(None);
    };
    taken
        .compatible(a, c)
        .map(|()| Some(a))
        .map_err(|e| format!("sharing key {key:?}: {e}"))
}

/// The first free address of `family` in the auto-assign pools that serve `c` (pools by name).
fn pick(pools: &Pools, taken: &Taken<'_>, c: &Claim, family: Family) -> Option<IpAddr> {
    let mut pools: Vec<&Pool> = pools
        .valid
        .iter()
        .filter(|p| p.spec.auto_assign && p.serves(&c.namespace, &c.labels))
        .collect();
    pools.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    for p in &pools {
        for r in p.ranges.iter().filter(|r| r.v6 == (family == Family::V6)) {
            // Bounded by the range; a taken address is skipped in one map lookup.
            let mut n = r.first;
            loop {
                let a = addr(r.v6, n);
                if p.usable(a) && !taken.0.contains_key(&a) {
                    return Some(a);
                }
                if n == r.last {
                    break;
                }
                n += 1;
            }
        }
    }
    None
}
