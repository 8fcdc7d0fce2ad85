//! The network-namespace lab: a client, a load balancer and N backends on one L2 segment (a bridge in
//! its own namespace), wired for direct server return.
//!
//! ```text
//!   client ns            lb ns (sluice XDP on eth0)          backend ns b0..bN-1
//!   eth0 10.X.Y.1        eth0 10.X.Y.2, ip_forward=0          eth0 10.X.Y.10+i, VIP/32 on lo
//!      |                    |                                   |
//!   sw-c ---------------- sw-lb (XDP_PASS, gro on) ------- sw-b<i>       (switch ns: bridge br0)
//! ```
//!
//! The client routes the VIP (10.X.Y+128.1/32) via the lb. The lb's kernel does not forward, so only
//! the XDP program can move a VIP packet on: it rewrites the MACs and sends the frame back out of the
//! same interface (XDP_TX) to the chosen backend, which answers the client directly from the VIP.
//! Each backend counts VIP packets by TTL with nft (64: XDP; 63: a kernel routed it).
//!
//! Everything the lab creates (namespaces and the processes in them, server threads, the private
//! bpffs mount, the temp dir) is removed when the [`Lab`] is dropped, also during a panic. Labs left by
//! a killed test process are removed by the next [`Lab::build`] of any process.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::cmd::{self, DEFAULT_TIMEOUT};
use crate::conn::LongConn;
use crate::netns;
use crate::nft::{self, VipCounters};
use crate::servers::{BackendServers, ECHO_PORT, UDP_PORT};

/// The lab's HTTP port (nginx on every backend; a tcp VIP in every config).
pub const HTTP_PORT: u16 = 80;
/// The interface name of each namespace's veth end (client, lb, backends).
pub const NS_IFACE: &str = "eth0";
/// How long one `sluice` command (not `run`) may take.
pub const SLUICE_TIMEOUT: Duration = Duration::from_secs(120);
/// The first UDP source port [`Lab::udp_vip`] uses by default: below the ephemeral range, so that
/// explicit ports never collide with curl's.
pub const UDP_FIRST_PORT: u16 = 20000;

/// What to build.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// Number of backends (1..=100; the spread tests use 3 or more). Default 3.
    pub backends: usize,
    /// Whether [`Lab::write_config`] also declares the UDP VIP (port 5353). The UDP responders run on
    /// every backend either way. Default true.
    pub udp: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        LabConfig {
            backends: 3,
            udp: true,
        }
    }
}

/// One backend's entry in a sluice config written by [`Lab::write_config`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSpec {
    /// Which lab backend (b<index>).
    pub index: usize,
    pub weight: u32,
    pub drain: bool,
}

impl BackendSpec {
    /// Weight 1, not draining.
    pub fn active(index: usize) -> BackendSpec {
        BackendSpec {
            index,
            weight: 1,
            drain: false,
        }
    }

    /// Weight 1, draining.
    pub fn drained(index: usize) -> BackendSpec {
        BackendSpec {
            index,
            weight: 1,
            drain: true,
        }
    }
}

/// The result of many HTTP requests: one body per success.
#[derive(Debug, Clone, Default)]
pub struct CurlResult {
    pub requested: usize,
    /// The response bodies, trimmed (each the name of the backend that answered, e.g. "b0").
    pub bodies: Vec<String>,
    /// Requests that got no body (requested - bodies.len()).
    pub failures: usize,
    pub exit_status: Option<i32>,
    /// curl's error messages.
    pub stderr: String,
}

/// The `sluice` binary the lab runs: `$SLUICE_BIN` when set, else `sluice` in the cargo profile
/// directory of the running executable (`target/<profile>/`, which holds test executables in `deps/`).
/// Cargo does not build another crate's binary for a test, so build it first:
/// `cargo build -p lb-userspace --bin sluice` (same profile as the tests); a binary older than
/// its sources is refused ([`crate::runs::ensure_fresh`]).
pub fn sluice_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_BIN") {
        let p = PathBuf::from(p);
        ensure!(
            p.is_file(),
            "SLUICE_BIN={} is not a file: build sluice or fix the variable",
            p.display()
        );
        return Ok(p);
    }
    let exe = std::env::current_exe().context("cannot find the running executable")?;
    let mut tried = Vec::new();
    let mut dir = exe.parent();
    // target/<profile>/deps/<test>  and  target/<profile>/<bin>
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join("sluice");
        if candidate.is_file() {
            crate::runs::ensure_fresh(&candidate)?;
            return Ok(candidate);
        }
        tried.push(candidate);
        dir = d.parent();
    }
    bail!(
        "sluice binary missing: looked for {} (set SLUICE_BIN, or build it first with \
         `cargo build -p lb-userspace --bin sluice` in the same profile as the tests)",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    )
}

/// A Prometheus text exposition (`/metrics`) as series (name with its labels) -> value.
pub fn parse_metrics(body: &[u8]) -> Result<std::collections::BTreeMap<String, f64>> {
    let text = std::str::from_utf8(body).context("/metrics is not UTF-8")?;
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l
                .rsplit_once(' ')
                .with_context(|| format!("/metrics: no value in {l:?}"))?;
            let value = value
                .parse()
                .with_context(|| format!("/metrics: bad value in {l:?}"))?;
            Ok((name.to_owned(), value))
        })
        .collect()
}

/// `ip -j neigh show` output as address -> (MAC, state): the entries with a MAC only (an
/// INCOMPLETE or FAILED one has none); the state is the first of its flags ("" when none).
pub fn parse_neighbours(json: &[u8]) -> Result<BTreeMap<IpAddr, (String, String)>> {
    let v: serde_json::Value =
        serde_json::from_slice(json).context("ip -j neigh show: not JSON")?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let addr: IpAddr = n.get("dst")?.as_str()?.parse().ok()?;
            let mac = n.get("lladdr")?.as_str()?.to_owned();
            let state = n
                .get("state")
                .and_then(|s| s.get(0))
                .and_then(|s| s.as_str())
                .unwrap_or("")
                .to_owned();
            Some((addr, (mac, state)))
        })
        .collect())
}

/// Panics with an explanation unless this process can build labs (root, `ip netns`). The lab tests
/// never pass silently without it: CI runs them as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        panic!(
            "the sluice lab tests create network namespaces, veths, a bpffs mount and XDP programs: \
             they need root (running as uid {euid}). Run them as root, e.g. `sudo -E cargo test -p sluice-tests`."
        );
    }
    for tool in ["ip", "ethtool", "nft", "nginx", "curl", "sysctl"] {
        let found = std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            panic!(
                "the sluice lab needs `{tool}` on PATH (Debian packages: iproute2 ethtool nftables \
                 nginx-light curl procps; scripts/bootstrap.sh installs them)"
            );
        }
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE_CLEANUP: Once = Once::new();

/// A fresh "sl<pid>-<n>" lab id (every lab kind shares the numbering and the stale cleanup),
/// after removing what labs of dead processes left behind (once per process).
pub(crate) fn next_lab_id() -> (String, u32, u32) {
    STALE_CLEANUP.call_once(cleanup_stale);
    let pid = std::process::id();
    let n = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
    (format!("sl{pid}-{n}"), pid, n)
}

/// A running lab. See the module documentation.
pub struct Lab {
    cfg: LabConfig,
    /// "sl<pid>-<n>": the prefix of every namespace name.
    id: String,
    dir: PathBuf,
    bpffs: PathBuf,
    bpffs_mounted: bool,
    pin_dir: PathBuf,
    peer_pin_dir: PathBuf,
    /// 10.X.Y.0/24
    net: [u8; 3],
    vip: Ipv4Addr,
    /// Every namespace created so far, in creation order.
    namespaces: Vec<String>,
    sw: String,
    client: String,
    lb: String,
    backends: Vec<String>,
    backend_macs: Vec<String>,
    nginx: Vec<Child>,
    servers: Vec<BackendServers>,
    stop_flags: Mutex<Vec<Arc<AtomicBool>>>,
    peer_xdp: Mutex<bool>,
    seq: AtomicU32,
}

impl Lab {
    /// Builds the whole lab: namespaces, bridge, veths (tx checksum offload off), addresses,
    /// sysctls, routes, nft counters, nginx, the UDP and echo servers, the bpffs mount. Fails with
    /// what went wrong; whatever was already created is removed again.
    pub fn build(cfg: LabConfig) -> Result<Lab> {
        ensure!(
            (1..=100).contains(&cfg.backends),
            "LabConfig.backends must be between 1 and 100, got {}",
            cfg.backends
        );
        let (id, pid, n) = next_lab_id();
        // Each lab has its own addresses: they never meet, being in separate namespaces, but
        // distinct numbers make captures and logs of parallel labs easy to tell apart.
        let h = pid.wrapping_mul(2_654_435_761) ^ n.wrapping_mul(40_503);
        let net = [10, 100 + ((h >> 8) % 100) as u8, (h % 128) as u8];
        let vip = Ipv4Addr::new(10, net[1], net[2] + 128, 1);

        let dir = std::env::temp_dir().join(format!("sluice-lab-{pid}-{n}"));
        if dir.exists() {
            let _ = fs::remove_dir_all(&dir);
        }
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let bpffs = dir.join("bpffs");

        let mut lab = Lab {
            sw: format!("{id}-sw"),
            client: format!("{id}-c"),
            lb: format!("{id}-lb"),
            backends: (0..cfg.backends).map(|i| format!("{id}-b{i}")).collect(),
            backend_macs: (0..cfg.backends)
                .map(|i| format!("02:5c:{:02x}:{:02x}:00:{:02x}", net[1], net[2], i))
                .collect(),
            cfg,
            id,
            pin_dir: bpffs.join("sluice"),
            peer_pin_dir: bpffs.join("peer"),
            bpffs,
            bpffs_mounted: false,
            dir,
            net,
            vip,
            namespaces: Vec::new(),
            nginx: Vec::new(),
            servers: Vec::new(),
            stop_flags: Mutex::new(Vec::new()),
            peer_xdp: Mutex::new(false),
            seq: AtomicU32::new(0),
        };
        // On error `lab` is dropped here, which removes whatever was built.
        lab.setup()
            .with_context(|| format!("building lab {}", lab.id))?;
        Ok(lab)
    }

    fn setup(&mut self) -> Result<()> {
        // A private bpffs in the root mount namespace: `ip netns exec` children see it (they get a
        // slave copy of the root mounts), unlike /sys/fs/bpf, which `ip netns exec` remounts.
        fs::create_dir_all(&self.bpffs)?;
        cmd::sh(&["mount", "-t", "bpf", "bpf", &self.bpffs.to_string_lossy()])?;
        self.bpffs_mounted = true;
        fs::create_dir_all(&self.pin_dir)?;
        fs::create_dir_all(&self.peer_pin_dir)?;

        let all: Vec<String> = [self.sw.clone(), self.client.clone(), self.lb.clone()]
            .into_iter()
            .chain(self.backends.clone())
            .collect();
        for ns in &all {
            cmd::sh(&["ip", "netns", "add", ns])?;
            self.namespaces.push(ns.clone());
            self.ip(ns, &["link", "set", "lo", "up"])?;
        }

        let sw = self.sw.clone();
        self.ip(&sw, &["link", "add", "br0", "type", "bridge"])?;
        self.ip(&sw, &["link", "set", "br0", "up"])?;

        // (namespace, switch-side name, address, mac, prefix)
        let mut ends = vec![
            (
                self.client.clone(),
                "sw-c".to_string(),
                self.client_addr(),
                self.mac(1, 0),
            ),
            (
                self.lb.clone(),
                self.lb_peer_iface().to_string(),
                self.lb_addr(),
                self.mac(2, 0),
            ),
        ];
        for i in 0..self.cfg.backends {
            ends.push((
                self.backends[i].clone(),
                format!("sw-b{i}"),
                self.backend_addr(i),
                self.backend_macs[i].clone(),
            ));
        }
        for (ns, sw_if, addr, mac) in &ends {
            self.ip(
                &sw,
                &[
                    "link", "add", sw_if, "type", "veth", "peer", "name", NS_IFACE, "address", mac,
                    "netns", ns,
                ],
            )?;
            self.ip(&sw, &["link", "set", sw_if, "master", "br0"])?;
            // Checksum offload off on both ends: a veth that sends into a native XDP path must
            // compute checksums itself, or TCP/UDP arrive with bad ones (ping would still work).
            self.exec_ok(&sw, &["ethtool", "-K", sw_if, "tx", "off"])?;
            self.exec_ok(ns, &["ethtool", "-K", NS_IFACE, "tx", "off"])?;
            self.ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", NS_IFACE])?;
            self.ip(&sw, &["link", "set", sw_if, "up"])?;
            self.ip(ns, &["link", "set", NS_IFACE, "up"])?;
        }
        // XDP_TX out of the lb's eth0 lands on its peer, which needs an XDP program there (attached
        // by `sluice xdp-pass` on first use of sluice, see ensure_peer_xdp); GRO helps redirect.
        self.exec_ok(&sw, &["ethtool", "-K", self.lb_peer_iface(), "gro", "on"])?;

        let common = [
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
        ];
        cmd::sysctl_in(
            &sw,
            &[
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        let client = self.client.clone();
        cmd::sysctl_in(
            &client,
            &[
                &common[..],
                &[
                    "net.ipv4.conf.all.accept_redirects=0",
                    "net.ipv4.conf.eth0.accept_redirects=0",
                ],
            ]
            .concat(),
        )?;
        // Only XDP may move VIP packets on: with ip_forward=0 the lb's kernel drops them.
        let lb = self.lb.clone();
        cmd::sysctl_in(
            &lb,
            &[
                &common[..],
                &[
                    "net.ipv4.ip_forward=0",
                    "net.ipv4.conf.all.send_redirects=0",
                    "net.ipv4.conf.eth0.send_redirects=0",
                ],
            ]
            .concat(),
        )?;
        let vip32 = format!("{}/32", self.vip);
        self.ip(
            &client,
            &[
                "route",
                "add",
                &vip32,
                "via",
                &self.lb_addr().to_string(),
                "dev",
                NS_IFACE,
            ],
        )?;

        for i in 0..self.cfg.backends {
            let ns = self.backends[i].clone();
            // The VIP on lo, never answered for in ARP: the lb owns it on the wire.
            cmd::sysctl_in(
                &ns,
                &[
                    &common[..],
                    &[
                        "net.ipv4.conf.all.arp_ignore=1",
                        "net.ipv4.conf.all.arp_announce=2",
                        "net.ipv4.conf.eth0.arp_ignore=1",
                        "net.ipv4.conf.eth0.arp_announce=2",
                        "net.ipv4.conf.lo.rp_filter=0",
                    ],
                ]
                .concat(),
            )?;
            self.ip(&ns, &["addr", "add", &vip32, "dev", "lo"])?;
            let rules = self.dir.join(format!("nft-b{i}.conf"));
            fs::write(&rules, nft::ruleset(self.vip))?;
            self.exec_ok(&ns, &["nft", "-f", &rules.to_string_lossy()])?;
            let child = self.start_nginx(i)?;
            self.nginx.push(child);
            let servers =
                BackendServers::start(&ns, &self.backend_name(i), self.backend_addr(i), self.vip)?;
            self.servers.push(servers);
        }
        for i in 0..self.cfg.backends {
            self.wait_nginx(i)?;
        }
        Ok(())
    }

    fn start_nginx(&self, i: usize) -> Result<Child> {
        let name = self.backend_name(i);
        let d = self.dir.join(format!("nginx-{name}"));
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir_all(d.join("tmp").join(sub))?;
        }
        let p = |s: &str| d.join(s).to_string_lossy().into_owned();
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {pid};
error_log {err} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {t}/body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    default_type text/plain;
    keepalive_timeout 5s;
    server {{
        listen {HTTP_PORT} backlog=4096;
        listen [::]:{HTTP_PORT} ipv6only=on backlog=4096;
        location / {{ return 200 \"{name}\\n\"; }}
    }}
}}
",
            pid = p("nginx.pid"),
            err = p("error.log"),
            t = p("tmp"),
        );
        fs::write(d.join("nginx.conf"), conf)?;
        let log = fs::File::create(d.join("stderr.log"))?;
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.backends[i],
                "nginx",
                "-p",
                &p(""),
                "-c",
                &p("nginx.conf"),
                "-e",
                &p("error.log"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting nginx for {name} (is nginx-light installed?)"))
    }

    fn wait_nginx(&mut self, i: usize) -> Result<()> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.backend_addr(i), HTTP_PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.nginx[i].try_wait()? {
                let d = self.dir.join(format!("nginx-{}", self.backend_name(i)));
                let log = fs::read_to_string(d.join("error.log")).unwrap_or_default()
                    + &fs::read_to_string(d.join("stderr.log")).unwrap_or_default();
                bail!(
                    "nginx of {} exited ({status}): {}",
                    self.backend_name(i),
                    log.trim()
                );
            }
            let up = netns::run_in(&self.backends[i], move || {
                Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "nginx of {} does not listen on {addr} after 10 s",
                    self.backend_name(i)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    // ----- names and addresses -----

    /// "sl<pid>-<n>", the prefix of the lab's namespace names.
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn config(&self) -> &LabConfig {
        &self.cfg
    }
    /// The lab's temp dir (configs, logs, nginx files, the bpffs mount).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn vip(&self) -> Ipv4Addr {
        self.vip
    }
    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 1)
    }
    pub fn lb_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 2)
    }
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], 10 + i as u8)
    }
    pub fn backend_addrs(&self) -> Vec<Ipv4Addr> {
        (0..self.cfg.backends)
            .map(|i| self.backend_addr(i))
            .collect()
    }
    pub fn backend_macs(&self) -> Vec<String> {
        self.backend_macs.clone()
    }
    /// "b<i>": what backend i answers over HTTP, UDP and in echoes.
    pub fn backend_name(&self, i: usize) -> String {
        format!("b{i}")
    }
    /// The backend index of a name like "b2".
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        name.strip_prefix('b')?
            .parse()
            .ok()
            .filter(|&i| i < self.cfg.backends)
    }
    pub fn backends(&self) -> usize {
        self.cfg.backends
    }
    pub fn lb_ns(&self) -> &str {
        &self.lb
    }
    /// The lb's interface (where sluice attaches), inside [`Lab::lb_ns`].
    pub fn lb_iface(&self) -> &str {
        NS_IFACE
    }
    pub fn client_ns(&self) -> &str {
        &self.client
    }
    pub fn backend_ns(&self, i: usize) -> &str {
        &self.backends[i]
    }
    /// The namespace of the bridge.
    pub fn switch_ns(&self) -> &str {
        &self.sw
    }
    /// The switch-side peer of the lb's veth (in [`Lab::switch_ns`]), where the XDP_PASS program goes.
    pub fn lb_peer_iface(&self) -> &str {
        "sw-lb"
    }
    /// The switch-side peer of the client's veth (in [`Lab::switch_ns`]).
    pub fn client_peer_iface(&self) -> &str {
        "sw-c"
    }
    /// The MAC address of the client's [`NS_IFACE`].
    pub fn client_mac(&self) -> String {
        self.mac(1, 0)
    }
    /// The MAC address of the lb's [`NS_IFACE`].
    pub fn lb_mac(&self) -> String {
        self.mac(2, 0)
    }
    /// The `--pin-dir` of every sluice command: a directory in the lab's private bpffs.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
    /// Where the peer's XDP_PASS program is pinned (kept apart from [`Lab::pin_dir`] so that
    /// "sluice detach leaves no pins" can be checked).
    pub fn peer_pin_dir(&self) -> &Path {
        &self.peer_pin_dir
    }
    fn mac(&self, role: u8, i: u8) -> String {
        format!(
            "02:5c:{:02x}:{:02x}:{role:02x}:{i:02x}",
            self.net[1], self.net[2]
        )
    }

    // ----- commands -----

    /// Runs `cmd` inside namespace `ns` (`ip netns exec`), with the default timeout; any exit status.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        cmd::run(
            Command::new("ip").args(["netns", "exec", ns]).args(argv),
            DEFAULT_TIMEOUT,
        )
    }

    /// Like [`Lab::exec`], failing unless the command exits 0.
    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        cmd::run_ok(
            Command::new("ip").args(["netns", "exec", ns]).args(argv),
            DEFAULT_TIMEOUT,
        )
    }

    fn ip(&self, ns: &str, args: &[&str]) -> Result<Output> {
        cmd::run_ok(
            Command::new("ip").args(["-n", ns]).args(args),
            DEFAULT_TIMEOUT,
        )
    }

    // ----- sluice -----

    /// The sluice config for the lab's VIP: tcp/80 (nginx), tcp/7000 (echo) and, when `cfg.udp`,
    /// udp/5353, each with the given backends. Returns the file's path (a new file per call).
    pub fn write_config(&self, backends: &[BackendSpec]) -> Result<PathBuf> {
        self.write_config_with(backends, None)
    }

    /// As [`Lab::write_config`], with a `flow_table_size` (connection-table entries) when given.
    pub fn write_config_with(
        &self,
        backends: &[BackendSpec],
        flow_table_size: Option<u32>,
    ) -> Result<PathBuf> {
        let top: Vec<String> = flow_table_size
            .map(|n| format!("flow_table_size: {n}"))
            .into_iter()
            .collect();
        self.write_config_top(backends, &top)
    }

    /// As [`Lab::write_config`], with these top-level lines (settings such as
    /// `max_new_flows_per_cpu: 0`) before `vips:`.
    pub fn write_config_top(&self, backends: &[BackendSpec], top: &[String]) -> Result<PathBuf> {
        for b in backends {
            ensure!(
                b.index < self.cfg.backends,
                "BackendSpec.index {} out of range: the lab has {} backends",
                b.index,
                self.cfg.backends
            );
        }
        let mut ports = vec![(HTTP_PORT, "tcp"), (ECHO_PORT, "tcp")];
        if self.cfg.udp {
            ports.push((UDP_PORT, "udp"));
        }
        let mut y = format!(
            "# sluice config written by the sluice-tests lab {}\n",
            self.id
        );
        for line in top {
            writeln!(y, "{line}")?;
        }
        y.push_str("vips:\n");
        for (port, proto) in ports {
            writeln!(
                y,
                "  - address: {}\n    port: {port}\n    protocol: {proto}",
                self.vip
            )?;
            if backends.is_empty() {
                y.push_str("    backends: []\n");
                continue;
            }
            y.push_str("    backends:\n");
            for b in backends {
                writeln!(
                    y,
                    "      - address: {}\n        mac: {}\n        weight: {}\n        drain: {}",
                    self.backend_addr(b.index),
                    self.backend_macs[b.index],
                    b.weight,
                    b.drain
                )?;
            }
        }
        let path = self.dir.join(format!(
            "config-{}.yaml",
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        fs::write(&path, y).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Attaches an XDP_PASS program on the lb's peer (needed for XDP_TX on veth) once per lab, with
    /// `sluice xdp-pass` in the switch namespace.
    pub fn ensure_peer_xdp(&self) -> Result<()> {
        let mut done = self.peer_xdp.lock().unwrap();
        if *done {
            return Ok(());
        }
        self.attach_peer_xdp(self.lb_peer_iface())?;
        *done = true;
        Ok(())
    }

    /// `sluice xdp-pass` on switch port `peer` (in the switch namespace).
    fn attach_peer_xdp(&self, peer: &str) -> Result<()> {
        let bin = sluice_binary()?;
        cmd::run_ok(
            Command::new("ip")
                .args(["netns", "exec", &self.sw])
                .arg(&bin)
                .arg("--pin-dir")
                .arg(&self.peer_pin_dir)
                .args(["xdp-pass", "--iface", peer]),
            SLUICE_TIMEOUT,
        )
        .with_context(|| {
            format!("attaching the XDP_PASS program to the switch port {peer} (sluice xdp-pass)")
        })?;
        Ok(())
    }

    /// Adds a second port to the lb namespace: `eth<i>` (MAC [`Lab::lb_port_mac`], no address) on
    /// the same bridge, with its switch-side peer `sw-lb<i>` ready for XDP_TX. A second sluice can
    /// attach there, standing in for a second load-balancer node on the segment (both share the
    /// lb namespace, and so its loopback API server). Returns the interface name.
    pub fn add_lb_port(&self, i: u8) -> Result<String> {
        ensure!(i >= 1, "lb port 0 is the lab's own eth0");
        let (iface, peer, mac) = (format!("eth{i}"), format!("sw-lb{i}"), self.lb_port_mac(i));
        self.ip(
            &self.sw,
            &[
                "link", "add", &peer, "type", "veth", "peer", "name", &iface, "address", &mac,
                "netns", &self.lb,
            ],
        )?;
        self.ip(&self.sw, &["link", "set", &peer, "master", "br0"])?;
        self.exec_ok(&self.sw, &["ethtool", "-K", &peer, "tx", "off"])?;
        self.exec_ok(&self.lb, &["ethtool", "-K", &iface, "tx", "off"])?;
        self.ip(&self.sw, &["link", "set", &peer, "up"])?;
        self.ip(&self.lb, &["link", "set", &iface, "up"])?;
        self.exec_ok(&self.sw, &["ethtool", "-K", &peer, "gro", "on"])?;
        self.attach_peer_xdp(&peer)?;
        Ok(iface)
    }

    /// The MAC of lb port `eth<i>` (`i` = 0 is [`Lab::lb_mac`]).
    pub fn lb_port_mac(&self, i: u8) -> String {
        self.mac(2, i)
    }

    /// The first address of a /27 beside the lab's VIP, for address pools: 10.X.Y+128.32.
    pub fn pool_base(&self) -> Ipv4Addr {
        let o = self.vip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 32)
    }

    /// Makes every address of `base/len` a VIP the lab can answer: on every backend's lo (a
    /// local route for the whole prefix, never answered for in ARP), routed by the client via
    /// the lb.
    pub fn serve_prefix(&self, base: Ipv4Addr, len: u8) -> Result<()> {
        let p = format!("{base}/{len}");
        for i in 0..self.cfg.backends {
            self.ip(&self.backends[i], &["addr", "add", &p, "dev", "lo"])?;
        }
        self.ip(
            &self.client,
            &[
                "route",
                "add",
                &p,
                "via",
                &self.lb_addr().to_string(),
                "dev",
                NS_IFACE,
            ],
        )?;
        Ok(())
    }

    /// Makes the client resolve the VIP itself (an on-link route) instead of sending it to the
    /// lb's address: what a client on the segment of an announced VIP does.
    pub fn client_vip_on_link(&self) -> Result<()> {
        let vip32 = format!("{}/32", self.vip);
        self.ip(&self.client, &["route", "replace", &vip32, "dev", NS_IFACE])?;
        Ok(())
    }

    /// Makes the client resolve every address of `base/len` itself (an on-link route): the
    /// client of announced pool addresses.
    pub fn client_prefix_on_link(&self, base: Ipv4Addr, len: u8) -> Result<()> {
        let p = format!("{base}/{len}");
        self.ip(&self.client, &["route", "replace", &p, "dev", NS_IFACE])?;
        Ok(())
    }

    /// Makes the client resolve each of `addrs` (one ping each, all at once, answered or not):
    /// its neighbour table then holds the MAC that answered its ARP.
    pub fn client_resolve(&self, addrs: &[IpAddr]) -> Result<()> {
        let pings: Vec<String> = addrs
            .iter()
            .map(|a| format!("ping -c1 -W1 -q {a} >/dev/null 2>&1 &"))
            .collect();
        self.exec_ok(
            &self.client,
            &["sh", "-c", &format!("{} wait", pings.join(" "))],
        )?;
        Ok(())
    }

    /// The client's neighbour table: address -> (MAC, state), entries with a MAC only.
    pub fn client_neighbours(&self) -> Result<BTreeMap<IpAddr, (String, String)>> {
        let out = self.ip(&self.client, &["-j", "neigh", "show", "dev", NS_IFACE])?;
        parse_neighbours(&out.stdout)
    }

    /// The client's neighbour entry for `addr`: (MAC, state), if any.
    pub fn client_neighbour(&self, addr: impl Into<IpAddr>) -> Result<Option<(String, String)>> {
        let addr = addr.into();
        let out = self.ip(&self.client, &["-j", "neigh", "show", &addr.to_string()])?;
        Ok(parse_neighbours(&out.stdout)?.remove(&addr))
    }

    /// Runs `sluice --pin-dir <pin_dir> <args>` in the lb namespace (after making sure the peer has
    /// its XDP_PASS program) and returns its output whatever the exit status.
    pub fn sluice(&self, args: &[&str]) -> Result<Output> {
        self.ensure_peer_xdp()?;
        let bin = sluice_binary()?;
        cmd::run(
            Command::new("ip")
                .args(["netns", "exec", &self.lb])
                .arg(&bin)
                .arg("--pin-dir")
                .arg(&self.pin_dir)
                .args(args),
            SLUICE_TIMEOUT,
        )
    }

    /// Like [`Lab::sluice`], failing (with stderr) unless it exits 0.
    pub fn sluice_ok(&self, args: &[&str]) -> Result<Output> {
        let out = self.sluice(args)?;
        if !out.status.success() {
            bail!(
                "`sluice {}` failed ({}): {}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            );
        }
        Ok(out)
    }

    /// Writes a config for `backends` and runs `sluice attach` on the lb's interface (persistent; a
    /// second call applies the difference). Returns the config's path.
    pub fn attach(&self, backends: &[BackendSpec]) -> Result<PathBuf> {
        self.attach_with(backends, &[])
    }

    /// As [`Lab::attach`], with top-level config lines (see [`Lab::write_config_top`]).
    pub fn attach_with(&self, backends: &[BackendSpec], top: &[String]) -> Result<PathBuf> {
        let config = self.write_config_top(backends, top)?;
        self.sluice_ok(&[
            "attach",
            "--config",
            &config.to_string_lossy(),
            "--iface",
            NS_IFACE,
        ])?;
        Ok(config)
    }

    /// `sluice detach` on the lb's interface.
    pub fn detach(&self) -> Result<()> {
        self.sluice_ok(&["detach", "--iface", NS_IFACE])?;
        Ok(())
    }

    /// Starts a long-running sluice (`sluice --pin-dir <pin_dir> <args>`) in the lb namespace; its
    /// stdout and stderr go to a log file in the lab dir. Stopped (SIGTERM, then SIGKILL after 10 s)
    /// when the guard is dropped.
    pub fn spawn_sluice(&self, args: &[&str]) -> Result<SluiceProcess> {
        self.spawn_sluice_under(&[], args)
    }

    /// Starts `sluice agent` on the lb node (its lb interface, nothing more than a kubeconfig
    /// and `/readyz` at `health`): the agent the benchmarks and the scale run time.
    pub fn spawn_lb_agent(&self, kubeconfig: &Path, health: &str) -> Result<SluiceProcess> {
        self.spawn_sluice(&[
            "agent",
            "--iface",
            self.lb_iface(),
            "--kubeconfig",
            &kubeconfig.to_string_lossy(),
            "--health-addr",
            health,
        ])
    }

    /// The HTTP status of an agent's `GET /readyz` at `health` (in the lb namespace), as curl
    /// prints it ("000" when nothing answers).
    pub fn readyz_status(&self, health: &str) -> Result<String> {
        let out = self.exec(
            self.lb_ns(),
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{health}/readyz"),
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits (up to 60 s) until agent `p` answers `/readyz` at `health` with 200; fails with its
    /// log if it exits first or never gets there.
    pub fn wait_agent_ready(&self, p: &mut SluiceProcess, health: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = p.try_wait()? {
                bail!("the agent exited ({status}): {}", p.log_text());
            }
            if self.readyz_status(health)? == "200" {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("the agent is not ready after 60 s: {}", p.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// [`Lab::spawn_sluice`] through `wrapper` (e.g. `setpriv` with a bounding set), which
    /// must exec sluice in place (the process's pid stays sluice's).
    pub fn spawn_sluice_under(&self, wrapper: &[&str], args: &[&str]) -> Result<SluiceProcess> {
        self.ensure_peer_xdp()?;
        let bin = sluice_binary()?;
        let log = self.dir.join(format!(
            "sluice-{}.log",
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.lb])
            .args(wrapper)
            .arg(&bin)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args);
        SluiceProcess::spawn(c, log)
    }

    /// Starts a long-running sluice in namespace `ns` with its own `pin_dir` (a node of a
    /// co-located lab: every backend runs sluice too), logging to the lab dir.
    pub fn spawn_sluice_in(
        &self,
        ns: &str,
        pin_dir: &Path,
        args: &[&str],
    ) -> Result<SluiceProcess> {
        let bin = sluice_binary()?;
        let log = self.dir.join(format!(
            "sluice-{}.log",
            self.seq.fetch_add(1, Ordering::SeqCst)
        ));
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(&bin)
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(args);
        SluiceProcess::spawn(c, log)
    }

    /// Makes backend `i` able to send with XDP_TX (the XDP_PASS program on its switch port):
    /// for labs where the backends balance too.
    pub fn enable_backend_xdp_tx(&self, i: usize) -> Result<()> {
        self.attach_peer_xdp(&format!("sw-b{i}"))
    }

    /// The client sends the VIP to backend `i` (as a router that learnt it from that node
    /// would), instead of the lb.
    pub fn client_route_vip_via_backend(&self, i: usize) -> Result<()> {
        self.route_vip_via(&self.client, i)
    }

    /// In namespace `ns`: the VIP's /32 via backend `i`.
    fn route_vip_via(&self, ns: &str, i: usize) -> Result<()> {
        self.ip(
            ns,
            &[
                "route",
                "replace",
                &format!("{}/32", self.vip),
                "via",
                &self.backend_addr(i).to_string(),
                "dev",
                NS_IFACE,
            ],
        )?;
        Ok(())
    }

    /// Writes a config for `backends`, starts `sluice run` with it and waits (at most `timeout`)
    /// until an XDP program is attached to the lb's interface.
    pub fn run_sluice(&self, backends: &[BackendSpec], timeout: Duration) -> Result<SluiceProcess> {
        let config = self.write_config(backends)?;
        self.run_sluice_with(&config, timeout)
    }

    /// Starts `sluice run --config <config>` and waits (at most `timeout`) until an XDP program is
    /// attached to the lb's interface. SIGHUP makes it re-read that same file.
    pub fn run_sluice_with(&self, config: &Path, timeout: Duration) -> Result<SluiceProcess> {
        let mut p = self.spawn_sluice(&[
            "run",
            "--config",
            &config.to_string_lossy(),
            "--iface",
            NS_IFACE,
        ])?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = p.try_wait()? {
                bail!(
                    "`{}` exited early ({status}): {}",
                    p.what,
                    p.log_text().trim()
                );
            }
            if self.xdp_attached()? {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{}`: no XDP program on {} after {timeout:?}; log: {}",
                    p.what,
                    NS_IFACE,
                    p.log_text().trim()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `sluice inspect stats -o json`, parsed.
    pub fn stats(&self) -> Result<serde_json::Value> {
        let out = self.sluice_ok(&["inspect", "stats", "--iface", NS_IFACE, "-o", "json"])?;
        serde_json::from_slice(&out.stdout)
            .context("`sluice inspect stats -o json` did not print JSON")
    }

    /// Scrapes `sluice run`'s or `sluice agent`'s `/metrics` at `addr` from inside the lb
    /// namespace (where it listens, on loopback by default): every sample, `name{labels}` -> value.
    pub fn metrics(&self, addr: &str) -> Result<std::collections::BTreeMap<String, f64>> {
        self.metrics_in(&self.lb, addr)
    }

    /// [`Lab::metrics`] of a sluice listening at `addr` in namespace `ns`.
    pub fn metrics_in(
        &self,
        ns: &str,
        addr: &str,
    ) -> Result<std::collections::BTreeMap<String, f64>> {
        let url = format!("http://{addr}/metrics");
        let out = self.exec_ok(ns, &["curl", "-sS", "--max-time", "10", "--fail", &url])?;
        parse_metrics(&out.stdout)
    }

    /// `sluice inspect announce` on `iface` (lb namespace): (address, MAC) of every address
    /// this node answers ARP or neighbour solicitations for.
    pub fn announced(&self, iface: &str) -> Result<Vec<(String, String)>> {
        let out = self.sluice_ok(&["inspect", "announce", "--iface", iface, "-o", "json"])?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["announced"]
            .as_array()
            .context("inspect announce: no list")?
            .iter()
            .map(|e| {
                (
                    e["address"].as_str().unwrap_or("").to_owned(),
                    e["mac"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect())
    }

    /// The series (`sluice_…` names) deploy/grafana/sluice-dashboard.json queries.
    pub fn dashboard_series() -> std::collections::BTreeSet<&'static str> {
        include_str!("../../deploy/grafana/sluice-dashboard.json")
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("sluice_"))
            .collect()
    }

    /// Whether the lb's interface has an XDP program (from `ip -j link show`).
    pub fn xdp_attached(&self) -> Result<bool> {
        let out = self.ip(&self.lb, &["-j", "link", "show", "dev", NS_IFACE])?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("ip -j link show: not JSON")?;
        Ok(v.get(0).and_then(|l| l.get("xdp")).is_some())
    }

    /// Waits (at most `timeout`) until the lb's interface has (`attached`) or has no XDP program;
    /// returns how long that took. Detaching by unpinning a link is not immediate: the kernel
    /// releases the link (and frees the interface's XDP slot) a moment after the last reference.
    pub fn wait_xdp(&self, attached: bool, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.xdp_attached()? == attached {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{} on the lb's {NS_IFACE} after {timeout:?}",
                    if attached {
                        "still no XDP program"
                    } else {
                        "XDP program still attached"
                    }
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `ip -j -d link show` entry of the lb's interface (shows the XDP mode and program id).
    pub fn lb_link_json(&self) -> Result<serde_json::Value> {
        let out = self.ip(&self.lb, &["-j", "-d", "link", "show", "dev", NS_IFACE])?;
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).context("ip -j link show: not JSON")?;
        v.get(0)
            .cloned()
            .ok_or_else(|| anyhow!("ip -j link show {NS_IFACE}: empty"))
    }

    /// Every pinned object (file) under [`Lab::pin_dir`], recursively; empty directories are ignored.
    pub fn pins(&self) -> Result<Vec<PathBuf>> {
        fn walk(d: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
            for e in fs::read_dir(d).with_context(|| format!("listing {}", d.display()))? {
                let e = e?;
                if e.file_type()?.is_dir() {
                    walk(&e.path(), out)?;
                } else {
                    out.push(e.path());
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        if self.pin_dir.exists() {
            walk(&self.pin_dir, &mut out)?;
        }
        out.sort();
        Ok(out)
    }

    // ----- traffic -----

    /// `n` HTTP GETs from the client namespace to `http://<host>/`, each on a new TCP connection
    /// (`Connection: close`), up to 16 at once. Every request is bounded (3 s connect, 10 s total)
    /// and so is the whole batch.
    pub fn curl(&self, host: impl Into<IpAddr>, n: usize) -> Result<CurlResult> {
        ensure!(n >= 1, "curl: n must be at least 1");
        let url = format!(
            "http://{}/?req=[1-{n}]",
            SocketAddr::new(host.into(), HTTP_PORT)
        );
        let timeout = Duration::from_secs(30) + Duration::from_millis(20 * n as u64);
        let out = cmd::run(
            Command::new("ip")
                .args(["netns", "exec", &self.client])
                .args([
                    "curl",
                    "--silent",
                    "--show-error",
                    "--parallel",
                    "--parallel-max",
                    "16",
                    "--connect-timeout",
                    "3",
                    "--max-time",
                    "10",
                    "--header",
                    "Connection: close",
                    &url,
                ]),
            timeout,
        )?;
        let bodies: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        Ok(CurlResult {
            requested: n,
            failures: n.saturating_sub(bodies.len()),
            bodies,
            exit_status: out.status.code(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// `n` HTTP requests to the VIP (see [`Lab::curl`]); fails unless every one was answered.
    pub fn curl_vip(&self, n: usize) -> Result<Vec<String>> {
        let r = self.curl(self.vip, n)?;
        if r.failures > 0 {
            bail!(
                "{} of {n} HTTP requests to {} got no answer (curl exit {:?}): {}",
                r.failures,
                self.vip,
                r.exit_status,
                first_lines(&r.stderr, 5)
            );
        }
        Ok(r.bodies)
    }

    /// `n` UDP requests from the client namespace to `target`, request k from source port
    /// `first_port + k` (each from its own socket). Returns, per request, the name of the backend
    /// that answered, or None when no answer came in three tries of 500 ms. Bounded: at most ~1.5 s
    /// per request and 120 s in all.
    pub fn udp(
        &self,
        target: SocketAddrV4,
        n: usize,
        first_port: u16,
    ) -> Result<Vec<Option<String>>> {
        ensure!(
            first_port as usize + n <= 65536 && first_port > 0,
            "udp: source ports {first_port}..{} do not fit",
            first_port as usize + n
        );
        netns::run_in(&self.client, move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut answers = Vec::with_capacity(n);
            for k in 0..n {
                if Instant::now() >= deadline {
                    answers.push(None);
                    continue;
                }
                let port = first_port + k as u16;
                let sock = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
                    .with_context(|| {
                        format!("bind UDP source port {port} in the client namespace")
                    })?;
                sock.connect(target)?;
                sock.set_read_timeout(Some(Duration::from_millis(500)))?;
                let msg = format!("q{k}");
                let mut answer = None;
                let mut buf = [0u8; 256];
                for _try in 0..3 {
                    sock.send(msg.as_bytes())?;
                    if let Ok(len) = sock.recv(&mut buf) {
                        answer = Some(String::from_utf8_lossy(&buf[..len]).trim().to_string());
                        break;
                    }
                }
                answers.push(answer);
            }
            Ok(answers)
        })
    }

    /// `n` UDP requests to VIP:5353 from source ports `first_port..first_port+n` (see [`Lab::udp`]).
    pub fn udp_vip(&self, n: usize, first_port: u16) -> Result<Vec<Option<String>>> {
        self.udp(SocketAddrV4::new(self.vip, UDP_PORT), n, first_port)
    }

    /// A long-lived connection from the client namespace to the echo server at `target`
    /// (one line every 100 ms, at most 5 minutes). Torn down with the lab at the latest.
    pub fn long_conn(&self, target: SocketAddrV4) -> Result<LongConn> {
        let stop = Arc::new(AtomicBool::new(false));
        self.stop_flags.lock().unwrap().push(stop.clone());
        LongConn::open(
            &self.client,
            target,
            Duration::from_millis(100),
            Duration::from_secs(300),
            stop,
        )
    }

    /// A long-lived connection to VIP:7000 (see [`Lab::long_conn`]).
    pub fn long_conn_vip(&self) -> Result<LongConn> {
        self.long_conn(SocketAddrV4::new(self.vip, ECHO_PORT))
    }

    /// A UDP stream from the client namespace to VIP:5353 (one source port, a datagram every
    /// 100 ms, at most 5 minutes; see [`LongConn::open_udp`]). Torn down with the lab at the
    /// latest.
    pub fn udp_stream_vip(&self) -> Result<LongConn> {
        let stop = Arc::new(AtomicBool::new(false));
        self.stop_flags.lock().unwrap().push(stop.clone());
        LongConn::open_udp(
            &self.client,
            SocketAddrV4::new(self.vip, UDP_PORT),
            Duration::from_millis(100),
            Duration::from_secs(300),
            stop,
        )
    }

    // ----- counters -----

    /// Backend i's VIP counters (TTL 64 / other, SYNs, UDP).
    pub fn backend_counters(&self, i: usize) -> Result<VipCounters> {
        nft::read(&self.backends[i])
    }

    /// (VIP packets with TTL 64, VIP packets with another TTL) seen by backend i.
    pub fn backend_ttl_counts(&self, i: usize) -> Result<(u64, u64)> {
        let c = self.backend_counters(i)?;
        Ok((c.ttl64, c.ttl_other))
    }

    /// VIP packets seen by each backend.
    pub fn backend_hits(&self) -> Result<Vec<u64>> {
        (0..self.cfg.backends)
            .map(|i| Ok(self.backend_counters(i)?.packets()))
            .collect()
    }

    /// Zeroes every backend's VIP counters.
    pub fn reset_counters(&self) -> Result<()> {
        for ns in &self.backends {
            nft::reset(ns)?;
        }
        Ok(())
    }

    // ----- harness self-check -----

    /// Lets the lb's KERNEL route the VIP to backend i (ip_forward=1 and a /32 route): for checking
    /// the harness without sluice. Such packets reach the backend with TTL 63.
    pub fn kernel_route_vip_via(&self, i: usize) -> Result<()> {
        cmd::sysctl_in(&self.lb, &["net.ipv4.ip_forward=1"])?;
        self.route_vip_via(&self.lb, i)
    }

    /// Undoes [`Lab::kernel_route_vip_via`].
    pub fn kernel_route_vip_off(&self) -> Result<()> {
        let _ = self.ip(&self.lb, &["route", "del", &format!("{}/32", self.vip)]);
        cmd::sysctl_in(&self.lb, &["net.ipv4.ip_forward=0"])
    }

    // ----- IPv6 (dual-stack labs) -----

    /// The lab segment's IPv6 prefix (/64), unique per lab like its IPv4 one.
    fn prefix6(&self, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd5c,
            u16::from_be_bytes([self.net[1], self.net[2]]),
            0,
            0,
            0,
            0,
            0,
            host,
        )
    }
    /// The IPv6 VIP: outside the segment's /64, as the IPv4 VIP is outside its /24.
    pub fn vip6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd5c,
            u16::from_be_bytes([self.net[1], self.net[2]]),
            1,
            0,
            0,
            0,
            0,
            1,
        )
    }
    pub fn client_addr6(&self) -> Ipv6Addr {
        self.prefix6(1)
    }
    pub fn lb_addr6(&self) -> Ipv6Addr {
        self.prefix6(2)
    }
    pub fn backend_addr6(&self, i: usize) -> Ipv6Addr {
        self.prefix6(0x10 + i as u16)
    }

    /// Makes the lab dual-stack: IPv6 addresses on the client's, the lb's and the backends'
    /// eth0 (no duplicate address detection: usable at once), the IPv6 VIP on the backends'
    /// loopback (Linux answers Neighbor Solicitations only for addresses of the receiving
    /// interface, so the lb owns it on the wire), the client's route to it via the lb. nginx
    /// listens on IPv6 from the start.
    pub fn enable_ipv6(&self) -> Result<()> {
        let mut ends = vec![
            (self.client.clone(), self.client_addr6()),
            (self.lb.clone(), self.lb_addr6()),
        ];
        for i in 0..self.cfg.backends {
            ends.push((self.backends[i].clone(), self.backend_addr6(i)));
        }
        for (ns, addr) in &ends {
            cmd::sysctl_in(ns, &["net.ipv6.conf.all.disable_ipv6=0"])?;
            self.ip(
                ns,
                &[
                    "addr",
                    "add",
                    &format!("{addr}/64"),
                    "dev",
                    NS_IFACE,
                    "nodad",
                ],
            )?;
        }
        // Only XDP may move VIP packets on (as for IPv4, ip_forward=0).
        cmd::sysctl_in(&self.lb, &["net.ipv6.conf.all.forwarding=0"])?;
        let vip128 = format!("{}/128", self.vip6());
        for ns in &self.backends {
            self.ip(ns, &["addr", "add", &vip128, "dev", "lo", "nodad"])?;
        }
        self.ip(
            &self.client,
            &[
                "-6",
                "route",
                "add",
                &vip128,
                "via",
                &self.lb_addr6().to_string(),
                "dev",
                NS_IFACE,
            ],
        )?;
        Ok(())
    }

    /// [`Lab::client_vip_on_link`] for the IPv6 VIP: the client solicits its neighbour itself.
    pub fn client_vip6_on_link(&self) -> Result<()> {
        let vip128 = format!("{}/128", self.vip6());
        self.ip(
            &self.client,
            &["-6", "route", "replace", &vip128, "dev", NS_IFACE],
        )?;
        Ok(())
    }

    /// `n` HTTP requests to the IPv6 VIP (see [`Lab::curl`]); fails unless every one was answered.
    pub fn curl_vip6(&self, n: usize) -> Result<Vec<String>> {
        let r = self.curl(self.vip6(), n)?;
        if r.failures > 0 {
            bail!(
                "{} of {n} HTTP requests to [{}] got no answer (curl exit {:?}): {}",
                r.failures,
                self.vip6(),
                r.exit_status,
                first_lines(&r.stderr, 5)
            );
        }
        Ok(r.bodies)
    }

    /// The namespaces the lab created (all removed on drop).
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// The pids of nginx processes (for checking teardown).
    pub fn nginx_pids(&self) -> Vec<u32> {
        self.nginx.iter().map(|c| c.id()).collect()
    }

    fn teardown(&mut self) {
        for f in self.stop_flags.lock().unwrap().iter() {
            f.store(true, Ordering::SeqCst);
        }
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        for c in &mut self.nginx {
            cmd::terminate(c, Duration::from_secs(5));
        }
        self.nginx.clear();
        remove_lab(
            &self.id,
            &mut self.namespaces,
            &self.bpffs,
            &mut self.bpffs_mounted,
            &self.dir,
        );
    }
}

/// The end of every lab kind's teardown: kills the processes in its namespaces and deletes
/// them (newest first), unmounts its private bpffs and removes its temp dir. Reports what it
/// cannot remove and goes on.
pub(crate) fn remove_lab(
    id: &str,
    namespaces: &mut Vec<String>,
    bpffs: &Path,
    bpffs_mounted: &mut bool,
    dir: &Path,
) {
    let me = std::process::id();
    for ns in namespaces.iter().rev() {
        kill_ns_processes(ns, me);
        if let Err(e) = cmd::sh(&["ip", "netns", "del", ns]) {
            eprintln!("sluice lab {id}: cannot delete namespace {ns}: {e:#}");
        }
    }
    namespaces.clear();
    if *bpffs_mounted {
        unmount(bpffs);
        *bpffs_mounted = false;
    }
    if let Err(e) = fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("sluice lab {id}: cannot remove {}: {e}", dir.display());
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A `sluice` process started by [`Lab::spawn_sluice`]; SIGTERM (then SIGKILL) on drop.
pub struct SluiceProcess {
    child: Child,
    log: PathBuf,
    what: String,
}

impl SluiceProcess {
    /// Starts `command` with its output going to `log`.
    pub(crate) fn spawn(command: Command, log: PathBuf) -> Result<SluiceProcess> {
        let what = cmd::describe(&command);
        let child = cmd::spawn_logged(command, &log)?;
        Ok(SluiceProcess { child, log, what })
    }

    pub fn what(&self) -> &str {
        &self.what
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    pub fn log_path(&self) -> &Path {
        &self.log
    }
    /// What it printed so far.
    pub fn log_text(&self) -> String {
        // Lossy: a log cut mid-character (a panic, a kill) is still worth reading.
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
    /// Its exit status if it has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }
    /// SIGTERM, wait up to `grace`, then SIGKILL. Returns the exit status.
    pub fn stop(mut self, grace: Duration) -> Result<ExitStatus> {
        cmd::terminate(&mut self.child, grace)
            .ok_or_else(|| anyhow!("`{}` did not exit after SIGKILL", self.what))
    }
}

impl Drop for SluiceProcess {
    fn drop(&mut self) {
        cmd::terminate(&mut self.child, Duration::from_secs(10));
    }
}

fn first_lines(s: &str, n: usize) -> String {
    s.lines().take(n).collect::<Vec<_>>().join(" | ")
}

/// SIGKILLs every process whose network namespace is `ns` (never `me`), and waits briefly for them.
pub(crate) fn kill_ns_processes(ns: &str, me: u32) {
    let pids = |ns: &str| -> Vec<u32> {
        cmd::run(
            Command::new("ip").args(["netns", "pids", ns]),
            Duration::from_secs(10),
        )
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
    };
    for _round in 0..3 {
        let list: Vec<u32> = pids(ns).into_iter().filter(|&p| p != me).collect();
        if list.is_empty() {
            return;
        }
        for &p in &list {
            cmd::signal(p, libc::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while list.iter().any(|&p| cmd::pid_alive(p)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
    }
}

pub(crate) fn unmount(p: &Path) {
    let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid C string; MNT_DETACH never blocks on busy mounts.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        eprintln!(
            "sluice lab: cannot unmount {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
    }
}

/// Parses "sl<pid>-<n>-<role>" (a lab namespace name) into the pid.
fn lab_ns_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("sl")?;
    let mut parts = rest.splitn(3, '-');
    let pid: u32 = parts.next()?.parse().ok()?;
    let _n: u32 = parts.next()?.parse().ok()?;
    let role = parts.next()?;
    let numbered = |prefix: &str| {
        role.strip_prefix(prefix)
            .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
    };
    // "sw" "c" "lb" "b<i>": the L2 lab; "r" "lb<k>": the routed lab.
    let known = matches!(role, "sw" | "c" | "lb" | "r") || numbered("b") || numbered("lb");
    known.then_some(pid)
}

/// Parses "sluice-lab-<pid>-<n>" (a lab temp dir name) into the pid.
fn lab_dir_pid(name: &str) -> Option<u32> {
    temp_dir_pid(name, "sluice-lab-")
}

/// Parses "<prefix><pid>-<n>" (a lab's or a cluster's temp dir name) into the pid.
pub(crate) fn temp_dir_pid(name: &str, prefix: &str) -> Option<u32> {
    let (pid, n) = name.strip_prefix(prefix)?.split_once('-')?;
    n.parse::<u32>().ok()?;
    pid.parse().ok()
}

/// Deletes the network namespaces whose name `owner` parses to a pid that is `dead`, after
/// killing the processes in them (but `me`).
pub(crate) fn remove_dead_namespaces(
    owner: impl Fn(&str) -> Option<u32>,
    dead: impl Fn(u32) -> bool,
    me: u32,
) {
    let Ok(out) = cmd::run(
        Command::new("ip").args(["netns", "list"]),
        Duration::from_secs(10),
    ) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if owner(name).is_some_and(&dead) {
            eprintln!("sluice: removing namespace {name} left by a dead test process");
            kill_ns_processes(name, me);
            let _ = cmd::run(
                Command::new("ip").args(["netns", "del", name]),
                Duration::from_secs(10),
            );
        }
    }
}

/// Unmounts what is mounted in the temp dirs whose name `owner` parses to a pid that is
/// `dead`, deepest first.
pub(crate) fn unmount_dead_temp_dirs(
    owner: impl Fn(&str) -> Option<u32>,
    dead: impl Fn(u32) -> bool,
) {
    let Ok(mountinfo) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let tmp = std::env::temp_dir();
    let mut mount_points: Vec<&str> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| {
            Path::new(mp)
                .strip_prefix(&tmp)
                .ok()
                .and_then(|r| r.components().next())
                .is_some_and(|c| owner(&c.as_os_str().to_string_lossy()).is_some_and(&dead))
        })
        .collect();
    mount_points.sort_by_key(|m| std::cmp::Reverse(m.len()));
    for mp in mount_points {
        unmount(Path::new(mp));
    }
}

/// Removes what labs of dead processes left behind (a test killed before its Drop ran): their
/// namespaces (and processes in them), bpffs mounts and temp dirs. Only names of the lab's own
/// patterns whose pid no longer exists are touched.
fn cleanup_stale() {
    let me = std::process::id();
    let dead = |pid: u32| pid != me && !cmd::pid_alive(pid);
    remove_dead_namespaces(lab_ns_pid, dead, me);
    unmount_dead_temp_dirs(lab_dir_pid, dead);
    let tmp = std::env::temp_dir();
    if let Ok(entries) = fs::read_dir(&tmp) {
        for e in entries.flatten() {
            if lab_dir_pid(&e.file_name().to_string_lossy()).is_some_and(dead) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lab_names() {
        assert_eq!(lab_ns_pid("sl1234-0-lb"), Some(1234));
        assert_eq!(lab_ns_pid("sl1234-7-b12"), Some(1234));
        assert_eq!(lab_ns_pid("sl1234-7-sw"), Some(1234));
        assert_eq!(lab_ns_pid("sl1234-7-r"), Some(1234));
        assert_eq!(lab_ns_pid("sl1234-7-lb1"), Some(1234));
        assert_eq!(lab_ns_pid("sl1234-7-x"), None);
        assert_eq!(lab_ns_pid("sl1234-7-b"), None);
        assert_eq!(lab_ns_pid("slow-1-lb"), None);
        assert_eq!(lab_ns_pid("other"), None);
        assert_eq!(lab_dir_pid("sluice-lab-99-3"), Some(99));
        assert_eq!(lab_dir_pid("sluice-lab-99"), None);
    }

    #[test]
    fn neighbours_with_a_mac_only() {
        // As iproute2 prints them: a resolved entry, a failed one (no MAC), a stale IPv6 one.
        let json = br#"[{"dst":"10.0.0.5","dev":"eth0","lladdr":"02:00:00:00:00:05","state":["REACHABLE"]},
            {"dst":"10.0.0.6","dev":"eth0","state":["FAILED"]},
            {"dst":"fd00::7","dev":"eth0","lladdr":"02:00:00:00:00:07","router":null,"state":["STALE"]}]"#;
        let table = parse_neighbours(json).unwrap();
        let entry = |mac: &str, state: &str| (mac.to_owned(), state.to_owned());
        assert_eq!(
            table,
            BTreeMap::from([
                (
                    "10.0.0.5".parse().unwrap(),
                    entry("02:00:00:00:00:05", "REACHABLE")
                ),
                (
                    "fd00::7".parse().unwrap(),
                    entry("02:00:00:00:00:07", "STALE")
                ),
            ])
        );
        assert!(
            parse_neighbours(b"").is_err(),
            "no output is not an empty table"
        );
    }
}
