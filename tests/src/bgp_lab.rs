//! A BGP lab: the co-located lab (three node namespaces, each running `sluice agent --bgp`
//! against a real kube-apiserver) with a real router, FRR or BIRD from Debian, in the lab's
//! `lb` namespace. The client's only route to the VIP is via the router, whose kernel ECMP
//! route has one next hop per node that announces it:
//!
//! ```text
//!   client ns  -- VIP via router -->  router ns (lb): FRR/BIRD, ip_forward=1, L4 multipath hash
//!                                       |  BGP sessions from the nodes (they connect; it listens)
//!                                     node0 node1 node2: sluice agent --bgp (XDP), VIP on lo
//! ```
//!
//! FRR runs in its "pathspace" `/etc/frr/<namespace>/` (host state): [`Router`]'s drop stops it
//! and removes that directory and `/var/run/frr/<namespace>`, and starting a router removes
//! the ones a killed test process left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::Ipv4Addr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::agents_lab::{AgentsLab, WebService, check_agents};
pub use crate::agents_lab::{NODES, node_name};
use crate::cmd;
use crate::lab::SluiceProcess;

/// The nodes' AS (one for all: identical AS_PATHs) and the router's.
pub const NODE_ASN: u32 = 64512;
pub const ROUTER_ASN: u32 = 65000;
/// The agents' hold time (the default) and drain wait.
pub const HOLD_TIME: Duration = Duration::from_secs(3);
pub const DRAIN_WAIT: Duration = Duration::from_secs(2);
const FRR_ETC: &str = "/etc/frr";
const FRR_RUN: &str = "/var/run/frr";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterKind {
    Frr,
    Bird,
}

/// A BGP router in a namespace, stopped (and its host state removed) on drop.
pub struct Router {
    kind: RouterKind,
    ns: String,
    /// BIRD: its control socket; the process is `bird`.
    bird_ctl: PathBuf,
    bird: Option<Child>,
    /// FRR: [`Router::stop`] ran.
    frr_stopped: bool,
}

/// What a router asks of the nodes besides a session (FRR only).
#[derive(Clone, Debug, Default)]
pub struct RouterOptions {
    /// The nodes (indexes into the router's `nodes`) it runs BFD with.
    pub bfd: Vec<usize>,
    /// The TCP-MD5 password it expects of each node (`neighbor X password Y`), by index.
    pub passwords: BTreeMap<usize, String>,
    /// Its AS [default: [`ROUTER_ASN`]]; [`NODE_ASN`] makes the sessions iBGP.
    pub asn: Option<u32>,
    /// Nodes it also peers with over IPv6 (IPv6 unicast, with BFD), by their IPv6 address.
    pub ipv6_nodes: Vec<std::net::Ipv6Addr>,
}

impl Router {
    /// Starts `kind` in namespace `ns` (address `id`), passive towards `nodes`.
    /// `bfd`: the nodes (indexes into `nodes`) the router runs BFD with (FRR only).
    pub fn start(
        kind: RouterKind,
        ns: &str,
        id: Ipv4Addr,
        nodes: &[Ipv4Addr],
        bfd: &[usize],
        dir: &Path,
    ) -> Result<Router> {
        let options = RouterOptions {
            bfd: bfd.to_vec(),
            ..RouterOptions::default()
        };
        Self::start_with(kind, ns, id, nodes, &options, dir)
    }

    /// [`Router::start`] with BFD and passwords per node.
    pub fn start_with(
        kind: RouterKind,
        ns: &str,
        id: Ipv4Addr,
        nodes: &[Ipv4Addr],
        options: &RouterOptions,
        dir: &Path,
    ) -> Result<Router> {
        cmd::sysctl_in(
            ns,
            &[
                "net.ipv4.ip_forward=1",
                // Hash on ports too: connections from one client spread over the nodes.
                "net.ipv4.fib_multipath_hash_policy=1",
            ],
        )?;
        let mut router = Router {
            kind,
            ns: ns.to_owned(),
            bird_ctl: dir.join("bird.ctl"),
            bird: None,
            frr_stopped: false,
        };
        match kind {
            RouterKind::Frr => router.start_frr(id, nodes, options)?,
            RouterKind::Bird => {
                ensure!(
                    options.bfd.is_empty() && options.passwords.is_empty(),
                    "the BIRD lab runs without BFD and passwords"
                );
                router.start_bird(id, nodes, dir)?
            }
        }
        Ok(router)
    }

    fn start_frr(
        &mut self,
        id: Ipv4Addr,
        nodes: &[Ipv4Addr],
        options: &RouterOptions,
    ) -> Result<()> {
        remove_stale_frr_dirs();
        let etc = Path::new(FRR_ETC).join(&self.ns);
        let run = Path::new(FRR_RUN).join(&self.ns);
        fs::create_dir_all(&etc)?;
        fs::create_dir_all(&run)?;
        let daemons = fs::read_to_string(Path::new(FRR_ETC).join("daemons"))
            .context("reading /etc/frr/daemons (is frr installed? scripts/bootstrap.sh)")?
            .replace("bgpd=no", "bgpd=yes")
            .replace("bfdd=no", "bfdd=yes");
        fs::write(etc.join("daemons"), daemons)?;
        fs::write(etc.join("vtysh.conf"), "service integrated-vtysh-config\n")?;
        let asn = options.asn.unwrap_or(ROUTER_ASN);
        let (remote_as, multipath) = if asn == NODE_ASN {
            ("internal", "maximum-paths ibgp 16")
        } else {
            ("external", "maximum-paths 16")
        };
        let mut conf = format!(
            "frr defaults traditional
hostname {ns}
log file {run}/frr.log
!
bfd
 profile fast
  receive-interval 100
  transmit-interval 100
  detect-multiplier 3
 !
!
router bgp {asn}
 bgp router-id {id}
 no bgp ebgp-requires-policy
 bgp bestpath as-path multipath-relax
 neighbor nodes peer-group
 neighbor nodes remote-as {remote_as}
 neighbor nodes passive
 neighbor nodes timers 1 3
",
            ns = self.ns,
            run = run.display()
        );
        for (i, n) in nodes.iter().enumerate() {
            conf.push_str(&format!(" neighbor {n} peer-group nodes\n"));
            if options.bfd.contains(&i) {
                conf.push_str(&format!(" neighbor {n} bfd profile fast\n"));
            }
            if let Some(password) = options.passwords.get(&i) {
                conf.push_str(&format!(" neighbor {n} password {password}\n"));
            }
        }
        for n in &options.ipv6_nodes {
            conf.push_str(&format!(
                " neighbor {n} peer-group nodes\n neighbor {n} bfd profile fast\n"
            ));
        }
        conf.push_str(&format!(
            " address-family ipv4 unicast\n  {multipath}\n exit-address-family\n"
        ));
        if !options.ipv6_nodes.is_empty() {
            conf.push_str(&format!(
                " address-family ipv6 unicast\n  neighbor nodes activate\n  {multipath}\n exit-address-family\n"
            ));
        }
        conf.push_str("!\n");
        fs::write(etc.join("frr.conf"), conf)?;
        for d in [&etc, &run] {
            cmd::run_ok(
                Command::new("chown").args(["-R", "frr:frr", &d.to_string_lossy()]),
                cmd::DEFAULT_TIMEOUT,
            )?;
        }
        cmd::run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.ns,
                "/usr/lib/frr/frrinit.sh",
                "start",
                &self.ns,
            ]),
            Duration::from_secs(60),
        )
        .context("starting FRR in the router namespace")?;
        Ok(())
    }

    fn start_bird(&mut self, id: Ipv4Addr, nodes: &[Ipv4Addr], dir: &Path) -> Result<()> {
        let mut conf = format!(
            "router id {id};
log \"{log}\" all;
protocol device {{ scan time 1; }}
protocol kernel {{
  ipv4 {{ export all; import none; }};
  merge paths on limit 16;
}}
template bgp nodes {{
  local as {ROUTER_ASN};
  passive on;
  hold time 3;
  connect retry time 1;
  error wait time 1, 5;
  # RFC 8326: a route marked graceful-shutdown loses to the others (BIRD does not by itself).
  ipv4 {{
    import filter {{ if (65535, 0) ~ bgp_community then bgp_local_pref = 0; accept; }};
    export none;
  }};
}}
",
            log = dir.join("bird.log").display()
        );
        for (i, n) in nodes.iter().enumerate() {
            conf.push_str(&format!(
                "protocol bgp node{i} from nodes {{ neighbor {n} as {NODE_ASN}; }}\n"
            ));
        }
        let file = dir.join("bird.conf");
        fs::write(&file, conf)?;
        let log = fs::File::create(dir.join("bird.stderr"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, "bird", "-f", "-c"])
            .arg(&file)
            .arg("-s")
            .arg(&self.bird_ctl)
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting bird (is bird2 installed? scripts/bootstrap.sh)")?;
        self.bird = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.bird_ctl.exists() {
            ensure!(
                Instant::now() < deadline,
                "bird made no control socket in 20 s: {}",
                fs::read_to_string(dir.join("bird.stderr")).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn kind(&self) -> RouterKind {
        self.kind
    }

    /// The kernel's next hops for `addr`/32 in the router namespace (empty: no route).
    pub fn nexthops(&self, addr: Ipv4Addr) -> Result<BTreeSet<Ipv4Addr>> {
        let out = cmd::run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.ns,
                "ip",
                "-j",
                "route",
                "show",
                "exact",
                &format!("{addr}/32"),
            ]),
            cmd::DEFAULT_TIMEOUT,
        )?;
        parse_nexthops(&String::from_utf8_lossy(&out.stdout))
    }

    /// Polls the kernel route of `addr` until `done(next hops)`; returns them and how long it took.
    pub fn wait_nexthops(
        &self,
        addr: Ipv4Addr,
        timeout: Duration,
        what: &str,
        done: impl Fn(&BTreeSet<Ipv4Addr>) -> bool,
    ) -> Result<(BTreeSet<Ipv4Addr>, Duration)> {
        let start = Instant::now();
        loop {
            let hops = self.nexthops(addr)?;
            if done(&hops) {
                return Ok((hops, start.elapsed()));
            }
            if start.elapsed() > timeout {
                bail!(
                    "{:?} router: {what}: not within {timeout:?}; next hops of {addr}: {hops:?}; {}",
                    self.kind,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// FRR: the BGP paths of `addr`/32 as (peer, carries the graceful-shutdown community).
    pub fn frr_paths(&self, addr: Ipv4Addr) -> Result<Vec<(Ipv4Addr, bool)>> {
        ensure!(self.kind == RouterKind::Frr, "frr_paths on {:?}", self.kind);
        let v = self.vtysh_json(&format!("show bgp ipv4 unicast {addr}/32 json"))?;
        let mut out = Vec::new();
        for p in v["paths"].as_array().into_iter().flatten() {
            let peer = p
                .pointer("/peer/peerId")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("a path without peer: {p}"))?;
            let community = p.pointer("/community/string").and_then(Value::as_str);
            let gshut =
                community.is_some_and(|c| c.contains("graceful-shutdown") || c.contains("65535:0"));
            out.push((peer, gshut));
        }
        Ok(out)
    }

    /// FRR: the BGP paths of `addr`/32 as (peer, its communities as FRR writes them, its
    /// LOCAL_PREF).
    pub fn frr_path_attributes(&self, addr: Ipv4Addr) -> Result<Vec<(Ipv4Addr, String, u64)>> {
        ensure!(
            self.kind == RouterKind::Frr,
            "frr_path_attributes on {:?}",
            self.kind
        );
        let v = self.vtysh_json(&format!("show bgp ipv4 unicast {addr}/32 json"))?;
        let mut out = Vec::new();
        for p in v["paths"].as_array().into_iter().flatten() {
            let peer = p
                .pointer("/peer/peerId")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .with_context(|| format!("a path without peer: {p}"))?;
            let community = p
                .pointer("/community/string")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned();
            let local_pref = p.get("locPrf").and_then(Value::as_u64).unwrap_or(100);
            out.push((peer, community, local_pref));
        }
        Ok(out)
    }

    /// FRR: the neighbours whose session is Established.
    pub fn frr_established(&self) -> Result<BTreeSet<Ipv4Addr>> {
        ensure!(
            self.kind == RouterKind::Frr,
            "frr_established on {:?}",
            self.kind
        );
        let v = self.vtysh_json("show bgp neighbors json")?;
        Ok(v.as_object()
            .into_iter()
            .flatten()
            .filter(|(_, n)| n.get("bgpState").and_then(Value::as_str) == Some("Established"))
            .filter_map(|(addr, _)| addr.parse().ok())
            .collect())
    }

    /// FRR: polls until the Established neighbours are `want`.
    pub fn wait_established(
        &self,
        want: &BTreeSet<Ipv4Addr>,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let now = self.frr_established()?;
            if &now == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "router {}: established {now:?}, want {want:?} within {timeout:?}; {}",
                    self.ns,
                    self.diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// FRR's BGP route to `addr` (`show ip route` or `show ipv6 route`, by its family): the
    /// next hops of the route zebra installed in the kernel (none: no such route).
    pub fn frr_installed_nexthops(
        &self,
        addr: std::net::IpAddr,
    ) -> Result<BTreeSet<std::net::IpAddr>> {
        let (show, len) = match addr {
            std::net::IpAddr::V4(_) => ("ip", 32),
            std::net::IpAddr::V6(_) => ("ipv6", 128),
        };
        let v = self.vtysh_json(&format!("show {show} route {addr}/{len} json"))?;
        Ok(v.as_object()
            .into_iter()
            .flatten()
            .flat_map(|(_, routes)| routes.as_array().into_iter().flatten())
            .filter(|r| r["protocol"] == "bgp" && r["installed"] == true)
            .flat_map(|r| r["nexthops"].as_array().into_iter().flatten())
            .filter_map(|h| h["ip"].as_str()?.parse().ok())
            .collect())
    }

    fn vtysh_json(&self, command: &str) -> Result<Value> {
        let out = cmd::run_ok(
            Command::new("ip").args([
                "netns", "exec", &self.ns, "vtysh", "-N", &self.ns, "-c", command,
            ]),
            cmd::DEFAULT_TIMEOUT,
        )?;
        let text = String::from_utf8_lossy(&out.stdout);
        if text.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&text).with_context(|| format!("vtysh {command:?}: not JSON: {text}"))
    }

    /// What the router says of its sessions (for failure messages).
    pub fn diagnostics(&self) -> String {
        let out = match self.kind {
            RouterKind::Frr => Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &self.ns,
                    "vtysh",
                    "-N",
                    &self.ns,
                    "-c",
                    "show bgp summary",
                ])
                .output(),
            RouterKind::Bird => Command::new("birdc")
                .arg("-s")
                .arg(&self.bird_ctl)
                .args(["show", "protocols"])
                .output(),
        };
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("(no summary: {e})"))
    }
}

impl Router {
    /// Stops the router (FRR: and removes its host state); a second call does nothing.
    pub fn stop(&mut self) {
        match self.kind {
            RouterKind::Frr => {
                if self.frr_stopped {
                    return;
                }
                self.frr_stopped = true;
                let _ = cmd::run(
                    Command::new("ip").args([
                        "netns",
                        "exec",
                        &self.ns,
                        "/usr/lib/frr/frrinit.sh",
                        "stop",
                        &self.ns,
                    ]),
                    Duration::from_secs(30),
                );
                let _ = fs::remove_dir_all(Path::new(FRR_ETC).join(&self.ns));
                let _ = fs::remove_dir_all(Path::new(FRR_RUN).join(&self.ns));
            }
            RouterKind::Bird => {
                if let Some(mut child) = self.bird.take() {
                    cmd::terminate(&mut child, Duration::from_secs(5));
                }
            }
        }
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A second FRR router on the lab's segment, in a namespace of its own (`<lab id>-r<n>`, so
/// that a killed test's leftovers are removed like the lab's): a second rack's top-of-rack
/// router. Dropping it stops FRR, then removes the namespace.
pub struct ExtraRouter {
    pub router: Router,
    pub addr: Ipv4Addr,
    ns: String,
}

impl ExtraRouter {
    /// Router `n` (1 to 9) at the segment's address .250 - n + 1, passive towards `nodes`.
    pub fn start(
        lab: &crate::lab::Lab,
        n: u8,
        nodes: &[Ipv4Addr],
        options: &RouterOptions,
    ) -> Result<ExtraRouter> {
        ensure!((1..=9).contains(&n), "extra router {n}: 1 to 9");
        let ns = format!("{}-r{n}", lab.id());
        let o = lab.lb_addr().octets();
        let addr = Ipv4Addr::new(o[0], o[1], o[2], 251 - n);
        let sw_if = format!("sw-r{n}");
        let ip = |netns: &str, args: &[&str]| -> Result<()> {
            let mut argv = vec!["ip", "-n", netns];
            argv.extend_from_slice(args);
            cmd::run_ok(Command::new(argv[0]).args(&argv[1..]), cmd::DEFAULT_TIMEOUT).map(|_| ())
        };
        cmd::run_ok(
            Command::new("ip").args(["netns", "add", &ns]),
            cmd::DEFAULT_TIMEOUT,
        )?;
        // From here on the namespace is removed on error too.
        let mut extra = ExtraRouterNs { ns: ns.clone() };
        let sw = lab.switch_ns();
        ip(
            sw,
            &[
                "link", "add", &sw_if, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        ip(sw, &["link", "set", &sw_if, "master", "br0"])?;
        ip(sw, &["link", "set", &sw_if, "up"])?;
        ip(&ns, &["link", "set", "lo", "up"])?;
        ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", "eth0"])?;
        ip(&ns, &["link", "set", "eth0", "up"])?;
        let dir = lab.dir().join(format!("r{n}"));
        fs::create_dir_all(&dir)?;
        let router = Router::start_with(RouterKind::Frr, &ns, addr, nodes, options, &dir)?;
        extra.ns.clear(); // the router's drop order takes over
        Ok(ExtraRouter { router, addr, ns })
    }
}

impl Drop for ExtraRouter {
    fn drop(&mut self) {
        // FRR must stop before its namespace goes (fields drop after this body: stop it here).
        self.router.stop();
        let _ = cmd::run(
            Command::new("ip").args(["netns", "del", &self.ns]),
            Duration::from_secs(10),
        );
    }
}

/// Removes a half-built extra router's namespace (start failed before the router ran).
struct ExtraRouterNs {
    ns: String,
}

impl Drop for ExtraRouterNs {
    fn drop(&mut self) {
        if !self.ns.is_empty() {
            let _ = cmd::run(
                Command::new("ip").args(["netns", "del", &self.ns]),
                Duration::from_secs(10),
            );
        }
    }
}

/// `/etc/frr/<ns>` of lab namespaces ("sl<pid>-...") that no longer exist: left by a killed test.
fn remove_stale_frr_dirs() {
    let Ok(entries) = fs::read_dir(FRR_ETC) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("sl")
            && e.path().is_dir()
            && !Path::new("/var/run/netns").join(&name).exists()
        {
            let _ = fs::remove_dir_all(e.path());
            let _ = fs::remove_dir_all(Path::new(FRR_RUN).join(&name));
        }
    }
}

/// Next hops from `ip -j route show` output: one `gateway`, or a `nexthops` list.
pub fn parse_nexthops(json_text: &str) -> Result<BTreeSet<Ipv4Addr>> {
    let v: Value = if json_text.trim().is_empty() {
        json!([])
    } else {
        serde_json::from_str(json_text).with_context(|| format!("ip -j route: {json_text}"))?
    };
    let mut hops = BTreeSet::new();
    for route in v.as_array().into_iter().flatten() {
        let gateways = route
            .get("nexthops")
            .and_then(Value::as_array)
            .map(|n| {
                n.iter()
                    .filter_map(|h| h.get("gateway"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_else(|| route.get("gateway").into_iter().collect());
        for g in gateways {
            if let Some(a) = g.as_str().and_then(|s| s.parse().ok()) {
                hops.insert(a);
            }
        }
    }
    Ok(hops)
}

/// How the lab's router and agents are set up beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct BgpSetup {
    /// The nodes whose agent runs BFD with the router (and the router with them).
    pub bfd: Vec<usize>,
    /// The TCP-MD5 password the router expects of each node, by index.
    pub router_passwords: BTreeMap<usize, String>,
    /// The password each node's agent is given (`--bgp-password-file`), by index.
    pub agent_passwords: BTreeMap<usize, String>,
    /// The agents get no `--bgp-peers`: `BGPPeer` resources name their routers.
    pub peers_from_resources: bool,
}

/// The agents lab (API server, nodes, `web`), the router and one agent per node.
pub struct BgpLab {
    /// The nodes whose agent runs BFD.
    pub bfd: Vec<usize>,
    pub setup: BgpSetup,
    /// Dropped first: the agents, then the router, then the API server and the namespaces.
    pub agents: Vec<Option<SluiceProcess>>,
    pub router: Router,
    pub nodes: AgentsLab,
}

impl Deref for BgpLab {
    type Target = AgentsLab;
    fn deref(&self) -> &AgentsLab {
        &self.nodes
    }
}

impl BgpLab {
    /// Builds the lab with `kind` as the router and starts the three agents with `--bgp`;
    /// the nodes in `bfd` run BFD with the router too.
    pub fn start(kind: RouterKind, bfd: &[usize]) -> Result<BgpLab> {
        Self::start_with(
            kind,
            BgpSetup {
                bfd: bfd.to_vec(),
                ..BgpSetup::default()
            },
        )
    }

    /// [`BgpLab::start`] with passwords, or with the peers from `BGPPeer`s.
    pub fn start_with(kind: RouterKind, setup: BgpSetup) -> Result<BgpLab> {
        // The router's namespace is the lab's lb (the client already routes the VIP there).
        let nodes = AgentsLab::start(WebService {
            echo: true,
            ..WebService::default()
        })?;
        let lab = &nodes.lab;
        // Only pool addresses are announced: the lab's VIP and the next three (the scenarios
        // move the VIP and add a Local Service); no auto-assign, the test writes the status.
        let last = std::net::Ipv4Addr::from(u32::from(lab.vip()) + 3);
        nodes
            .kube
            .pool("lab", &[format!("{}-{last}", lab.vip())], false, false)?;
        if setup.peers_from_resources {
            // Reading the passwords' Secrets is the bgp overlay's grant, not the base's.
            let grant = crate::kube::repo_root().join("deploy/overlays/bgp/secrets-rbac.yaml");
            nodes
                .kube
                .kubectl_ok(&["apply", "-f", &grant.to_string_lossy()])?;
        }
        let router = Router::start_with(
            kind,
            lab.lb_ns(),
            lab.lb_addr(),
            &lab.backend_addrs(),
            &RouterOptions {
                bfd: setup.bfd.clone(),
                passwords: setup.router_passwords.clone(),
                ..RouterOptions::default()
            },
            lab.dir(),
        )?;
        let mut bgp = BgpLab {
            bfd: setup.bfd.clone(),
            setup,
            agents: Vec::new(),
            router,
            nodes,
        };
        for i in 0..NODES {
            bgp.lab.enable_backend_xdp_tx(i)?;
            let agent = bgp.spawn_agent(i)?;
            bgp.agents.push(Some(agent));
        }
        Ok(bgp)
    }

    /// Starts node `i`'s agent (again), with its password file as [`BgpSetup`] says (written
    /// anew on each start).
    pub fn spawn_agent(&self, i: usize) -> Result<SluiceProcess> {
        let peer = if self.setup.peers_from_resources {
            String::new()
        } else {
            format!("{}={ROUTER_ASN}", self.lab.lb_addr())
        };
        let asn = NODE_ASN.to_string();
        let drain = DRAIN_WAIT.as_secs().to_string();
        let bfd = if self.bfd.contains(&i) {
            "--bgp-bfd=true"
        } else {
            "--bgp-bfd=false"
        };
        let mut args = vec![
            "--bgp",
            "--bgp-asn",
            &asn,
            "--bgp-peers",
            &peer,
            "--bgp-drain-wait",
            &drain,
            bfd,
        ];
        let file = self.lab.dir().join(format!("bgp-password-{i}"));
        let file = file.to_string_lossy().into_owned();
        if let Some(password) = self.setup.agent_passwords.get(&i) {
            fs::write(&file, format!("{password}\n"))?;
            args.extend(["--bgp-password-file", &file]);
        }
        self.nodes.spawn_agent(i, &args)
    }

    /// Stops node `i`'s agent (SIGTERM, waits for it) and starts it again.
    pub fn restart_agent(&mut self, i: usize) -> Result<()> {
        if let Some(agent) = self.agents[i].take() {
            agent.stop(Duration::from_secs(15))?;
        }
        self.agents[i] = Some(self.spawn_agent(i)?);
        Ok(())
    }

    /// Runs `sluice inspect bgp <args>` in node `i`'s namespace (it asks the agent's health
    /// address there) and returns its output whatever the exit status.
    pub fn inspect_bgp(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let bin = crate::lab::sluice_binary()?;
        let bin = bin.to_string_lossy();
        let mut argv = vec![bin.as_ref(), "inspect", "bgp"];
        argv.extend(args);
        self.lab.exec(self.lab.backend_ns(i), &argv)
    }

    /// `sluice inspect bgp -o json`'s peers for node `i`, failing unless it exits 0.
    pub fn inspect_bgp_peers(&self, i: usize) -> Result<Vec<Value>> {
        let out = self.inspect_bgp(i, &["-o", "json"])?;
        ensure!(
            out.status.success(),
            "node {i}: sluice inspect bgp failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value =
            serde_json::from_slice(&out.stdout).context("sluice inspect bgp -o json: not JSON")?;
        Ok(v["peers"].as_array().cloned().unwrap_or_default())
    }

    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        self.lab.backend_addr(i)
    }

    pub fn all_nodes(&self) -> BTreeSet<Ipv4Addr> {
        self.lab.backend_addrs().into_iter().collect()
    }

    /// Waits until the router's kernel route to the VIP has exactly `want` as next hops.
    pub fn wait_route(&mut self, want: &BTreeSet<Ipv4Addr>, timeout: Duration) -> Result<Duration> {
        self.check_agents()?;
        let r = self.router.wait_nexthops(
            self.lab.vip(),
            timeout,
            &format!("next hops {want:?}"),
            |h| h == want,
        );
        match r {
            Ok((_, took)) => Ok(took),
            Err(e) => bail!("{e:#}\nagent logs:\n{}", self.agent_logs()),
        }
    }

    /// Fails if an agent that should run has exited.
    pub fn check_agents(&mut self) -> Result<()> {
        check_agents(self.agents.iter_mut().map(Option::as_mut))
    }

    /// The last lines of every agent's log.
    pub fn agent_logs(&self) -> String {
        self.agents
            .iter()
            .enumerate()
            .filter_map(|(i, a)| a.as_ref().map(|a| (i, a.log_text())))
            .map(|(i, log)| {
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(15)..].join("\n  ");
                format!("node {i}:\n  {tail}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGKILLs node `i`'s agent (no drain, no NOTIFICATION: the kernel closes its socket).
    pub fn kill_agent(&mut self, i: usize) -> Result<()> {
        let mut agent = self.agents[i]
            .take()
            .with_context(|| format!("node {i} has no agent"))?;
        cmd::signal(agent.pid(), libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.try_wait()?.is_none() {
            ensure!(Instant::now() < deadline, "agent {i} survived SIGKILL");
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// SIGTERM to node `i`'s agent without waiting; the process stays in `agents[i]`.
    pub fn term_agent(&self, i: usize) -> Result<()> {
        let agent = self.agents[i]
            .as_ref()
            .with_context(|| format!("node {i} has no agent"))?;
        cmd::signal(agent.pid(), libc::SIGTERM);
        Ok(())
    }

    /// Cuts node `i` off the segment without closing anything (every packet dropped in its
    /// namespace but on loopback, where its agent's `/metrics` and `/readyz` still answer), or
    /// (`false`) restores it.
    pub fn cut_off(&self, i: usize, cut: bool) -> Result<()> {
        let ns = self.lab.backend_ns(i);
        if cut {
            let rules = "table inet bgpcut {
  chain in { type filter hook input priority -300; policy drop; iifname \"lo\" accept; }
  chain out { type filter hook output priority -300; policy drop; oifname \"lo\" accept; }
}
";
            let file = self.lab.dir().join(format!("bgpcut-{i}.nft"));
            fs::write(&file, rules)?;
            self.lab
                .exec_ok(ns, &["nft", "-f", &file.to_string_lossy()])?;
        } else {
            self.lab
                .exec_ok(ns, &["nft", "delete", "table", "inet", "bgpcut"])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nexthops_of_single_and_multipath_routes() {
        let one = r#"[{"dst":"10.1.2.1","gateway":"10.1.2.10","dev":"eth0","protocol":"bgp","metric":20,"flags":[]}]"#;
        assert_eq!(
            parse_nexthops(one).unwrap(),
            BTreeSet::from(["10.1.2.10".parse().unwrap()])
        );
        let many = r#"[{"dst":"10.1.2.1","protocol":"bgp","metric":20,"flags":[],"nexthops":[{"gateway":"10.1.2.10","dev":"eth0","weight":1,"flags":[]},{"gateway":"10.1.2.11","dev":"eth0","weight":1,"flags":[]}]}]"#;
        assert_eq!(parse_nexthops(many).unwrap().len(), 2);
        assert!(parse_nexthops("").unwrap().is_empty());
        assert!(parse_nexthops("[]").unwrap().is_empty());
    }
}
