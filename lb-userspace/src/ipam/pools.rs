//! Address pools: parsed, validated, and asked which addresses they hold and whom they serve.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// An inclusive range of addresses of one family, as numbers (IPv4 in the low 32 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct AddrRange {
    pub v6: bool,
    pub first: u128,
    pub last: u128,
}

impl AddrRange {
    /// `10.0.0.0/24`, `10.0.0.10-10.0.0.20` or a single address (both families).
    pub fn parse(s: &str) -> Result<AddrRange, String> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let (a, b) = (parse_addr(a)?, parse_addr(b)?);
            let (ra, rb) = (num(a), num(b));
            if ra.0 != rb.0 {
                return Err(format!("{s:?}: the range mixes IPv4 and IPv6"));
            }
            if ra.1 > rb.1 {
                return Err(format!("{s:?}: the range ends before it starts"));
            }
            return Ok(AddrRange {
                v6: ra.0,
                first: ra.1,
                last: rb.1,
            });
        }
        if s.contains('/') {
            let net: IpNet = s
                .parse()
                .map_err(|_| format!("{s:?} is not a CIDR (e.g. 192.168.10.0/24, fd00::/120)"))?;
            if net.network() != net.addr() {
                return Err(format!(
                    "{s:?} has host bits set: did you mean {}?",
                    net.trunc()
                ));
            }
            let (v6, first) = num(net.network());
            let (_, last) = num(net.broadcast());
            return Ok(AddrRange { v6, first, last });
        }
        let (v6, n) = num(parse_addr(s)?);
        Ok(AddrRange {
            v6,
            first: n,
            last: n,
        })
    }

    pub fn contains(&self, a: IpAddr) -> bool {
        let (v6, n) = num(a);
        v6 == self.v6 && (self.first..=self.last).contains(&n)
    }

    pub fn overlaps(&self, o: &AddrRange) -> bool {
        self.v6 == o.v6 && self.first <= o.last && o.first <= self.last
    }
}

fn parse_addr(s: &str) -> Result<IpAddr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("{:?} is not an IPv4 or IPv6 address", s.trim()))
}

/// (is IPv6, the address as a number).
pub fn num(a: IpAddr) -> (bool, u128) {
    match a {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

pub fn addr(v6: bool, n: u128) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    }
}

/// A pool as its resource states it (see `k8s::pools` for the resource).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolSpec {
    pub name: String,
    /// Orders pools for overlaps (the older keeps its addresses): creation time, then name.
    pub created: String,
    pub addresses: Vec<String>,
    /// Services without a requested address get theirs from this pool.
    pub auto_assign: bool,
    /// Skip IPv4 addresses ending in .0 and .255 (some clients and routers mistreat them).
    pub avoid_buggy_ips: bool,
    /// A Service's `spec.externalIPs` inside this pool are served (CVE-2020-8554: off unless
    /// the pool's owner says so).
    pub allow_external_ips: bool,
    /// Only Services in these namespaces (all when empty).
    pub namespaces: Vec<String>,
    /// Only Services with all of these labels (all when empty).
    pub service_labels: BTreeMap<String, String>,
}

/// A pool that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    pub spec: PoolSpec,
    pub ranges: Vec<AddrRange>,
}

impl Pool {
    pub fn contains(&self, a: IpAddr) -> bool {
        self.ranges.iter().any(|r| r.contains(a))
    }

    /// Whether a Service of `namespace` with `labels` may have addresses from this pool.
    pub fn serves(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.spec.namespaces.is_empty() || self.spec.namespaces.iter().any(|n| n == namespace))
            && self
                .spec
                .service_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Whether `a` may be handed out (the .0/.255 rule).
    pub fn usable(&self, a: IpAddr) -> bool {
        match a {
            IpAddr::V4(v4) if self.spec.avoid_buggy_ips => !matches!(v4.octets()[3], 0 | 255),
            _ => true,
        }
    }
}

/// Pools that can be used, and why the others cannot (pool name -> reason).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pools {
    pub valid: Vec<Pool>,
    pub invalid: BTreeMap<String, String>,
}

impl Pools {
    /// Parses every pool; a pool with a bad address, or overlapping an older pool (or itself),
    /// is invalid and unused, and the others keep working.
    pub fn validate(mut specs: Vec<PoolSpec>) -> Pools {
        specs.sort_by(|a, b| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
        let mut out = Pools::default();
        'pools: for spec in specs {
            let mut ranges = Vec::new();
            for a in &spec.addresses {
                match AddrRange::parse(a) {
                    Ok(r) => ranges.push(r),
                    Err(e) => {
                        out.invalid.insert(spec.name.clone(), e);
                        continue 'pools;
                    }
                }
            }
            if ranges.is_empty() {
                out.invalid
                    .insert(spec.name.clone(), "it lists no addresses".into());
                continue;
            }
            for (i, r) in ranges.iter().enumerate() {
                if let Some(o) = ranges[i + 1..].iter().find(|o| o.overlaps(r)) {
                    out.invalid.insert(
                        spec.name.clone(),
                        format!("its ranges overlap ({} and {})", show(r), show(o)),
                    );
                    continue 'pools;
                }
                if let Some(older) = out
                    .valid
                    .iter()
                    .find(|p| p.ranges.iter().any(|o| o.overlaps(r)))
                {
                    out.invalid.insert(
                        spec.name.clone(),
                        format!(
                            "{} overlaps pool {} (older): an address belongs to one pool",
                            show(r),
                            older.spec.name
                        ),
                    );
                    continue 'pools;
                }
            }
            out.valid.push(Pool { spec, ranges });
        }
        out
    }

    /// The valid pool that holds `a`.
    pub fn pool_of(&self, a: IpAddr) -> Option<&Pool> {
        self.valid.iter().find(|p| p.contains(a))
    }

    pub fn is_empty(&self) -> bool {
        self.valid.is_empty() && self.invalid.is_empty()
    }
}

fn show(r: &AddrRange) -> String {
    if r.first == r.last {
        addr(r.v6, r.first).to_string()
    } else {
        format!("{}-{}", addr(r.v6, r.first), addr(r.v6, r.last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, created: &str, addrs: &[&str]) -> PoolSpec {
        PoolSpec {
            name: name.into(),
            created: created.into(),
            addresses: addrs.iter().map(|s| s.to_string()).collect(),
            auto_assign: true,
            ..PoolSpec::default()
        }
    }

    #[test]
    fn ranges_parse_in_every_form_and_refuse_nonsense() {
        let r = AddrRange::parse("10.0.0.0/30").unwrap();
        assert!(
            r.contains("10.0.0.3".parse().unwrap()) && !r.contains("10.0.0.4".parse().unwrap())
        );
        let r = AddrRange::parse("10.0.0.10 - 10.0.0.12").unwrap();
        assert_eq!((r.first, r.last), (0x0a00_000a, 0x0a00_000c));
        assert!(
            AddrRange::parse("fd00::/126")
                .unwrap()
                .contains("fd00::3".parse().unwrap())
        );
        assert!(
            !AddrRange::parse("fd00::/126")
                .unwrap()
                .contains("10.0.0.1".parse().unwrap())
        );
        for bad in [
            "10.0.0.1/24",
            "10.0.0.0/33",
            "10.0.0.5-10.0.0.1",
            "10.0.0.1-fd00::1",
            "x",
        ] {
            assert!(AddrRange::parse(bad).is_err(), "{bad} accepted");
        }
        assert!(
            AddrRange::parse("10.0.0.1/24")
                .unwrap_err()
                .contains("10.0.0.0/24")
        );
    }

    #[test]
    fn a_bad_or_overlapping_pool_is_set_aside_and_the_rest_keep_working() {
        let p = Pools::validate(vec![
            spec("late", "2026-02", &["10.0.0.128/25"]),
            spec("first", "2026-01", &["10.0.0.0/24"]),
            spec("bad", "2026-01", &["10.1.0.0/33"]),
            spec("self", "2026-03", &["10.2.0.0/24", "10.2.0.7"]),
            spec("ok", "2026-04", &["10.3.0.0/24", "fd00::/120"]),
        ]);
        let names: Vec<&str> = p.valid.iter().map(|p| p.spec.name.as_str()).collect();
        assert_eq!(names, ["first", "ok"]);
        assert!(
            p.invalid["late"].contains("overlaps pool first"),
            "{:?}",
            p.invalid
        );
        assert!(p.invalid["bad"].contains("10.1.0.0/33"));
        assert!(p.invalid["self"].contains("overlap"));
        assert_eq!(
            p.pool_of("fd00::5".parse().unwrap()).unwrap().spec.name,
            "ok"
        );
    }

    #[test]
    fn selectors_and_buggy_addresses() {
        let mut s = spec("p", "1", &["10.0.0.0/24"]);
        s.namespaces = vec!["prod".into()];
        s.service_labels = [("tier".to_string(), "web".to_string())].into();
        s.avoid_buggy_ips = true;
        let p = &Pools::validate(vec![s]).valid[0];
        let web: BTreeMap<String, String> = [("tier".to_string(), "web".to_string())].into();
        assert!(p.serves("prod", &web));
        assert!(!p.serves("dev", &web));
        assert!(!p.serves("prod", &BTreeMap::new()));
        assert!(!p.usable("10.0.0.0".parse().unwrap()) && !p.usable("10.0.0.255".parse().unwrap()));
        assert!(p.usable("10.0.0.1".parse().unwrap()));
    }
}
