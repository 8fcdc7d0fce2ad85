//! sluice owns the addresses it serves (issue 24), against a real kube-apiserver with the RBAC
//! that deploy/ ships: an IPAddressPool, `sluice agent`s in the lab's lb namespace (two, on two
//! ports of the segment, for the allocator's election), LoadBalancer Services created as users
//! do. Checked in the API (status, Events), in the maps (`inspect vips`, `inspect announce`)
//! and with real connections to the assigned addresses. Needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use sluice_tests::kube::{AGENT_NAMESPACE, Kube, repo_root};
use sluice_tests::{ECHO_PORT, HTTP_PORT, Lab, LabConfig, SluiceProcess, cmd, require_root};

/// The pool: 32 addresses (a /27) beside the lab's VIP, for the `default` namespace.
const POOL_LEN: u8 = 27;
/// The promise: 20 Services created at once all have their address within this.
const BURST_BOUND: Duration = Duration::from_secs(5);
/// Bound for anything else to show in the API or the maps (a busy CI host).
const CONVERGE: Duration = Duration::from_secs(30);
const LEASE: &str = "sluice-allocator";

/// A LoadBalancer Service to create: name, port, annotations.
type Svc = (String, u16, Vec<(&'static str, String)>);

struct Env {
    agents: BTreeMap<&'static str, SluiceProcess>,
    kube: Kube,
    lab: Lab,
    kubeconfig: PathBuf,
}

impl Env {
    fn start() -> Result<Env> {
        require_root();
        let lab = Lab::build(LabConfig {
            backends: 3,
            udp: false,
        })?;
        let kube = Kube::start(Some(lab.lb_ns()))?;
        let kubeconfig = kube.agent_kubeconfig()?;
        for i in 0..lab.backends() {
            kube.node(&format!("node-{i}"), lab.backend_addr(i), true)?;
        }
        lab.serve_prefix(lab.pool_base(), POOL_LEN)?;
        Ok(Env {
            agents: BTreeMap::new(),
            kube,
            lab,
            kubeconfig,
        })
    }

    /// An agent with `--announce` on `iface` as node `name` (health on `health`).
    fn spawn(&mut self, name: &'static str, iface: &str, health: &str) -> Result<()> {
        let kubeconfig = self.kubeconfig.to_string_lossy().into_owned();
        let mut p = self.lab.spawn_sluice(&[
            "agent",
            "--metrics-addr",
            "127.0.0.1:0",
            "--iface",
            iface,
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            name,
            "--health-addr",
            health,
            "--announce",
            "--lease-namespace",
            AGENT_NAMESPACE,
        ])?;
        self.lab
            .wait_agent_ready(&mut p, health)
            .with_context(|| format!("agent {name}"))?;
        self.agents.insert(name, p);
        Ok(())
    }

    fn logs(&self) -> String {
        self.agents
            .iter()
            .map(|(n, p)| format!("--- agent {n}:\n{}", p.log_text()))
            .collect()
    }

    /// LoadBalancer Services, one YAML document each: (name, port, annotations).
    fn services(&self, list: &[Svc]) -> Result<()> {
        let docs: Vec<String> = list
            .iter()
            .map(|(name, port, annotations)| {
                let ann: Vec<String> = annotations
                    .iter()
                    .map(|(k, v)| format!("{k}: {v:?}"))
                    .collect();
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default, annotations: {{{}}}}}\n\
                     spec:\n  type: LoadBalancer\n  selector: {{app: web}}\n  ports:\n    - {{name: p, port: {port}, protocol: TCP}}\n",
                    ann.join(", ")
                )
            })
            .collect();
        self.kube.apply_yaml(&docs.join("---\n"))
    }

    fn delete(&self, name: &str) -> Result<()> {
        self.kube
            .kubectl_ok(&["delete", "service", "-n", "default", name, "--wait=false"])?;
        Ok(())
    }

    /// Every Service of `default` with its status addresses.
    fn addresses(&self) -> Result<BTreeMap<String, Vec<IpAddr>>> {
        let v = self
            .kube
            .api("GET", "/api/v1/namespaces/default/services", None)?;
        let mut out = BTreeMap::new();
        for s in v["items"].as_array().context("no Service list")? {
            let name = s["metadata"]["name"].as_str().unwrap_or("").to_owned();
            let ips = s["status"]["loadBalancer"]["ingress"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["ip"].as_str()?.parse().ok())
                .collect();
            out.insert(name, ips);
        }
        Ok(out)
    }

    /// Waits until `done` holds of the Services' addresses.
    fn wait_addresses(
        &self,
        what: &str,
        bound: Duration,
        done: impl Fn(&BTreeMap<String, Vec<IpAddr>>) -> bool,
    ) -> Result<(BTreeMap<String, Vec<IpAddr>>, Duration)> {
        let start = Instant::now();
        loop {
            let a = self.addresses()?;
            if done(&a) {
                return Ok((a, start.elapsed()));
            }
            if start.elapsed() > bound {
                bail!("{what}: not within {bound:?}: {a:?}\n{}", self.logs());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Events on Service `name`: (reason, note).
    fn events(&self, name: &str) -> Result<Vec<(String, String)>> {
        let v = self.kube.api(
            "GET",
            "/apis/events.k8s.io/v1/namespaces/default/events",
            None,
        )?;
        Ok(v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["name"].as_str() == Some(name))
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or("").to_owned(),
                    e["note"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect())
    }

    fn wait_event(&self, name: &str, reason: &str, needle: &str) -> Result<String> {
        let start = Instant::now();
        loop {
            if let Some((_, note)) = self
                .events(name)?
                .into_iter()
                .find(|(r, n)| r == reason && n.contains(needle))
            {
                return Ok(note);
            }
            if start.elapsed() > CONVERGE {
                bail!(
                    "no {reason} Event on {name} saying {needle:?}: {:?}\n{}",
                    self.events(name)?,
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// `inspect vips` on `iface`: "address:port/proto" of each VIP.
    fn vips(&self, iface: &str) -> Result<BTreeSet<String>> {
        let out = self
            .lab
            .sluice_ok(&["inspect", "vips", "--iface", iface, "-o", "json"])?;
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v.as_array()
            .or_else(|| v["vips"].as_array())
            .context("inspect vips: no list")?
            .iter()
            .filter_map(|x| x["vip"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits (within [`CONVERGE`]) until `addr` is a VIP in the lb interface's maps.
    fn wait_vip(&self, addr: IpAddr) -> Result<()> {
        let start = Instant::now();
        while self
            .vips(self.lab.lb_iface())?
            .iter()
            .all(|v| !v.starts_with(&format!("{addr}:")))
        {
            ensure!(
                start.elapsed() < CONVERGE,
                "{addr} never became a VIP: {:?}",
                self.vips(self.lab.lb_iface())?
            );
            thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// `inspect announce` on `iface`: the addresses answered for.
    fn announced(&self, iface: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .lab
            .announced(iface)?
            .into_iter()
            .map(|(address, _)| address)
            .collect())
    }

    fn holder(&self) -> Result<String> {
        self.kube.lease_holder(AGENT_NAMESPACE, LEASE)
    }
}

fn in_pool(lab: &Lab, a: &IpAddr) -> bool {
    let base = u32::from(lab.pool_base());
    matches!(a, IpAddr::V4(v4) if (base..base + (1 << (32 - POOL_LEN))).contains(&u32::from(*v4)))
}

/// No address held by two Services, but those of one sharing key.
fn no_double_holding(a: &BTreeMap<String, Vec<IpAddr>>, shared: &[&str]) -> Result<()> {
    let mut holders: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for (name, ips) in a {
        for ip in ips {
            holders.entry(*ip).or_default().push(name);
        }
    }
    for (ip, names) in holders {
        let sharing = names.iter().all(|n| shared.contains(n));
        ensure!(
            names.len() == 1 || sharing,
            "{ip} is held by {names:?}: an address went to two Services"
        );
    }
    Ok(())
}

fn curl_answers(lab: &Lab, addr: IpAddr) -> Result<usize> {
    Ok(lab.curl(addr, 5)?.bodies.len())
}

#[test]
fn pools_assign_request_share_free_and_survive_a_leader_change() -> Result<()> {
    let mut env = Env::start()?;
    let base = env.lab.pool_base();
    // Both agents run before the pool exists: the resource is installed, the pool comes later.
    let eth0 = env.lab.lb_iface().to_owned();
    env.spawn("lb-a", &eth0, "127.0.0.1:9941")?;
    let eth1 = env.lab.add_lb_port(1)?;
    env.spawn("lb-b", &eth1, "127.0.0.1:9942")?;
    let last = Ipv4Addr::from(u32::from(base) + (1 << (32 - POOL_LEN)) - 1);
    env.kube
        .pool("lab", &[format!("{base}-{last}")], true, false)?;

    // ---- 20 Services at once: distinct pool addresses within 5 s, and they answer.
    let burst: Vec<Svc> = (0..20)
        .map(|i| (format!("web-{i}"), HTTP_PORT, vec![]))
        .collect();
    env.services(&burst)?;
    let (a, took) = env.wait_addresses("20 Services with an address", BURST_BOUND, |a| {
        (0..20).all(|i| a.get(&format!("web-{i}")).is_some_and(|v| v.len() == 1))
    })?;
    let distinct: BTreeSet<IpAddr> = (0..20).map(|i| a[&format!("web-{i}")][0]).collect();
    ensure!(
        distinct.len() == 20,
        "20 Services, {} addresses: {a:?}",
        distinct.len()
    );
    ensure!(
        distinct.iter().all(|ip| in_pool(&env.lab, ip)),
        "an address outside the pool: {a:?}"
    );
    println!(
        "20 Services created at once: 20 distinct pool addresses in {took:.2?} (bound {BURST_BOUND:?})"
    );
    env.wait_event("web-3", "IPAllocated", "assigned")?;
    let first = a["web-0"][0];
    env.wait_vip(first)?;
    let answers = curl_answers(&env.lab, first)?;
    ensure!(
        answers == 5,
        "{first} (web-0) answered {answers} of 5 requests"
    );
    println!("web-0 at {first}: 5 of 5 requests answered through sluice");

    // ---- A requested address (inside the pool, free), and one outside every pool.
    let wanted = Ipv4Addr::from(u32::from(base) + 30);
    env.services(&[
        (
            "asked".into(),
            HTTP_PORT,
            vec![("sluice.io/load-balancer-ips", wanted.to_string())],
        ),
        (
            "asked-outside".into(),
            HTTP_PORT,
            vec![("sluice.io/load-balancer-ips", "198.51.100.9".into())],
        ),
    ])?;
    env.wait_addresses("the requested address", CONVERGE, |a| {
        a.get("asked") == Some(&vec![IpAddr::V4(wanted)])
    })?;
    let note = env.wait_event(
        "asked-outside",
        "AllocationFailed",
        "outside every address pool",
    )?;
    ensure!(
        env.addresses()?["asked-outside"].is_empty(),
        "asked-outside got an address"
    );
    println!("requested {wanted}: assigned; requested 198.51.100.9: refused ({note})");

    // ---- Sharing: two Services of one key on different ports share an address; a third with
    // a colliding port gets an Event and no address.
    let key = ("sluice.io/allow-shared-ip", "dns".to_string());
    env.services(&[
        ("share-http".into(), HTTP_PORT, vec![key.clone()]),
        ("share-echo".into(), ECHO_PORT, vec![key.clone()]),
    ])?;
    let (a, _) = env.wait_addresses("the shared address", CONVERGE, |a| {
        a.get("share-http").is_some_and(|v| v.len() == 1)
            && a.get("share-echo") == a.get("share-http")
    })?;
    let shared = a["share-http"][0];
    env.services(&[("share-clash".into(), HTTP_PORT, vec![key.clone()])])?;
    let note = env.wait_event(
        "share-clash",
        "AllocationFailed",
        &format!("port {HTTP_PORT}/TCP"),
    )?;
    ensure!(
        env.addresses()?["share-clash"].is_empty(),
        "share-clash got an address"
    );
    let start = Instant::now();
    loop {
        let vips = env.vips(env.lab.lb_iface())?;
        if vips.contains(&format!("{shared}:{HTTP_PORT}/tcp"))
            && vips.contains(&format!("{shared}:{ECHO_PORT}/tcp"))
        {
            break;
        }
        ensure!(
            start.elapsed() < CONVERGE,
            "the shared address's two ports are not both VIPs: {vips:?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
    ensure!(
        curl_answers(&env.lab, shared)? == 5,
        "the shared address does not answer on port {HTTP_PORT}"
    );
    println!(
        "share-http and share-echo share {shared} (both ports VIPs, HTTP answers); share-clash refused: {note}"
    );

    // ---- Exhaustion: fill the pool; one more waits with an Event and gets the address a
    // deleted Service frees.
    let used = env
        .addresses()?
        .values()
        .flatten()
        .copied()
        .collect::<BTreeSet<_>>()
        .len();
    let room = (1usize << (32 - POOL_LEN)) - used;
    let fill: Vec<Svc> = (0..room)
        .map(|i| (format!("fill-{i}"), HTTP_PORT, vec![]))
        .collect();
    env.services(&fill)?;
    env.wait_addresses("the pool filled", CONVERGE, |a| {
        (0..room).all(|i| a.get(&format!("fill-{i}")).is_some_and(|v| v.len() == 1))
    })?;
    env.services(&[("pending".into(), HTTP_PORT, vec![])])?;
    env.wait_event("pending", "AllocationFailed", "no free IPv4 address")?;
    ensure!(
        env.addresses()?["pending"].is_empty(),
        "pending got an address from a full pool"
    );
    let freed = env.addresses()?["web-5"][0];
    env.delete("web-5")?;
    env.wait_addresses("the freed address to the pending Service", CONVERGE, |a| {
        a.get("pending") == Some(&vec![freed])
    })?;
    println!(
        "pool exhausted: pending waited with an Event, then got {freed} freed by web-5's deletion"
    );

    // ---- externalIPs outside every pool: neither forwarded nor announced.
    env.kube.apply_yaml(
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: default}\n\
         spec:\n  selector: {app: web}\n  externalIPs: [\"198.51.100.7\"]\n  ports:\n    - {name: p, port: 80, protocol: TCP}\n",
    )?;
    env.wait_event("ext", "ExternalIPRefused", "outside every address pool")?;
    let vips = env.vips(env.lab.lb_iface())?;
    ensure!(
        vips.iter().all(|v| !v.starts_with("198.51.100.")),
        "an address outside every pool is a VIP: {vips:?}"
    );
    let announced: BTreeSet<String> = env
        .announced(env.lab.lb_iface())?
        .union(&env.announced(&eth1)?)
        .cloned()
        .collect();
    ensure!(!announced.is_empty(), "nothing announced at all");
    ensure!(
        announced
            .iter()
            .all(|a| a.parse().is_ok_and(|ip: IpAddr| in_pool(&env.lab, &ip))),
        "an address outside the pool is announced: {announced:?}"
    );
    println!(
        "externalIP 198.51.100.7 (outside every pool): no VIP, not announced; {} pool addresses announced",
        announced.len()
    );
    no_double_holding(&env.addresses()?, &["share-http", "share-echo"])?;

    // ---- The allocating agent killed in the middle of a burst of 20 creations: the other
    // takes over, every Service gets an address, none is held twice.
    // Room for the burst: the first burst's Services and the fillers go.
    for name in (0..20)
        .map(|i| format!("web-{i}"))
        .chain((0..room).map(|i| format!("fill-{i}")))
    {
        if name != "web-5" {
            env.delete(&name)?;
        }
    }
    let holder = env.holder()?;
    ensure!(
        holder == "lb-a" || holder == "lb-b",
        "lease {LEASE} held by {holder:?}"
    );
    let burst: Vec<Svc> = (0..20)
        .map(|i| (format!("burst-{i}"), HTTP_PORT, vec![]))
        .collect();
    let docs = burst.clone();
    let victim = env
        .agents
        .get(holder.as_str())
        .map(SluiceProcess::pid)
        .context("the holder's process")?;
    thread::scope(|s| -> Result<()> {
        let creator = s.spawn(|| env.services(&docs));
        thread::sleep(Duration::from_millis(150));
        cmd::signal(victim, libc::SIGKILL);
        creator
            .join()
            .map_err(|_| anyhow::anyhow!("the creating thread panicked"))?
    })?;
    let survivor = if holder == "lb-a" { "lb-b" } else { "lb-a" };
    let (a, took) = env.wait_addresses(
        "the burst after the allocator's death",
        Duration::from_secs(40),
        |a| (0..20).all(|i| a.get(&format!("burst-{i}")).is_some_and(|v| v.len() == 1)),
    )?;
    no_double_holding(&a, &["share-http", "share-echo"])?;
    ensure!(
        env.holder()? == survivor,
        "lease {LEASE} not taken over by {survivor}: {}",
        env.holder()?
    );
    println!(
        "allocator {holder} SIGKILLed during a burst of 20: {survivor} took over, all 20 addressed in {took:.1?}, no address held twice"
    );
    Ok(())
}

/// The IPAddressPool resource installed after the agent started (issue: it was never watched
/// until a restart): the agent probes again every 30 s, starts the watch, and the Service that
/// waited gets a pool address and becomes a VIP, from the same agent process.
#[test]
fn a_pool_resource_installed_later_is_watched_without_a_restart() -> Result<()> {
    /// The agent's re-probe period (lb-userspace's crd_watch::REPROBE_EVERY).
    const REPROBE: Duration = Duration::from_secs(30);
    let mut env = Env::start()?;
    // deploy/ (applied with the agent's RBAC) installs the resource: take it away first.
    env.kube
        .kubectl_ok(&["delete", "crd", "ipaddresspools.sluice.io", "--wait=true"])?;
    env.services(&[("late".to_owned(), HTTP_PORT, vec![])])?;
    let eth0 = env.lab.lb_iface().to_owned();
    env.spawn("lb-a", &eth0, "127.0.0.1:9941")?;
    let log = env.logs();
    ensure!(
        log.contains("the IPAddressPool resource (sluice.io) is not installed"),
        "the agent did not say the resource is missing:\n{log}"
    );

    let crd = repo_root().join("deploy/base/05-crd-ipaddresspools.yaml");
    env.kube
        .kubectl_ok(&["apply", "-f", &crd.to_string_lossy()])?;
    let base = env.lab.pool_base();
    let last = Ipv4Addr::from(u32::from(base) + (1 << (32 - POOL_LEN)) - 1);
    env.kube
        .pool("lab", &[format!("{base}-{last}")], true, false)?;
    let (a, took) = env.wait_addresses("late's pool address", REPROBE + CONVERGE, |a| {
        a.get("late").is_some_and(|v| v.len() == 1)
    })?;
    let addr = a["late"][0];
    ensure!(in_pool(&env.lab, &addr), "{addr}: not in the pool");
    env.wait_vip(addr)?;
    let agent = env.agents.get_mut("lb-a").context("no agent lb-a")?;
    ensure!(
        agent.try_wait()?.is_none(),
        "the agent exited: {}",
        agent.log_text()
    );
    let log = agent.log_text();
    ensure!(
        log.contains("the IPAddressPool resource is there now: watching it"),
        "the agent did not say it found the resource:\n{log}"
    );
    println!(
        "the resource and a pool installed after the agent started: {addr} assigned in {took:.1?} (re-probe every {REPROBE:?}) and a VIP, same agent process"
    );
    Ok(())
}
