//! The routed lab: load balancers that reach their backends across L3 (`mode: ipip`), in IPv4
//! and IPv6, with the backends running sluice's own decapsulator.
//!
//! ```text
//!  client (eth0 10.1.0.1, fd00:a::1)       VIP 10.9.0.1 / fd00:9::1 via lb0 [and lb1: ECMP]
//!     |
//!   brA ------ lb<k> eth0 (10.1.0.2+k)  sluice run, native XDP        router ns: three bridges,
//!     |        lb<k> eth1 (10.3.0.2+k) --- brC (MTU configurable)      forwarding on, its own
//!   router                                   |                          addresses .254 / ::fe
//!   brB ------ backend b<i> eth0 (10.2.0.10+i), VIP on lo, `sluice decap`, echo + UDP servers
//! ```
//!
//! A VIP packet arrives on the lb's eth0, is wrapped (IPIP / IP6IP6) to the backend node and
//! redirected out of eth1 to the router (XDP_REDIRECT), which routes it to the backend. The
//! backend's decapsulator unwraps it; the reply goes straight back to the client through the
//! router (DSR). Namespaces are private, so fixed addresses are safe; everything is removed on
//! drop, and labs of dead test processes by the next lab of any kind.

use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::cmd::{self, DEFAULT_TIMEOUT};
use crate::conn::LongConn;
use crate::lab::{NS_IFACE, SLUICE_TIMEOUT, SluiceProcess, next_lab_id, remove_lab, sluice_binary};
use crate::netns;
use crate::servers::{BackendServers, ECHO_PORT, UDP_PORT};

pub const VIP4: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 1);
pub const CLIENT4: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 1);

#[derive(Debug, Clone)]
pub struct RoutedConfig {
    /// Load balancers (1 or 2; two share the VIP through an ECMP route on the client).
    pub lbs: usize,
    /// Backend nodes (1..=50).
    pub backends: usize,
    /// MTU of the link between the load balancers and the router (the encapsulated path).
    pub lb_egress_mtu: u32,
}

impl Default for RoutedConfig {
    fn default() -> Self {
        RoutedConfig {
            lbs: 1,
            backends: 3,
            lb_egress_mtu: 1500,
        }
    }
}

pub struct RoutedLab {
    cfg: RoutedConfig,
    id: String,
    dir: PathBuf,
    bpffs: PathBuf,
    bpffs_mounted: bool,
    namespaces: Vec<String>,
    servers: Vec<BackendServers>,
    /// One per long-lived connection handed out (dropping a connection raises its own), all
    /// raised at teardown.
    stop_flags: Mutex<Vec<Arc<AtomicBool>>>,
    config_seq: u32,
}

fn lb_addr4(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, 2 + k as u8)
}
fn lb_addr6(k: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xa, 0, 0, 0, 0, 0, 2 + k as u16)
}
pub fn backend_addr4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 2, 0, 10 + i as u8)
}
pub fn backend_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 0, 0x10 + i as u16)
}
/// Load balancer k's outer source prefixes (what its backends' decapsulators admit).
fn encap_prefixes(k: usize) -> (String, String) {
    (format!("10.99.{k}.0/24"), format!("fd99:{k}::/120"))
}

impl RoutedLab {
    pub fn build(cfg: RoutedConfig) -> Result<RoutedLab> {
        ensure!((1..=2).contains(&cfg.lbs), "lbs must be 1 or 2");
        ensure!((1..=50).contains(&cfg.backends), "backends must be 1..=50");
        let (id, pid, n) = next_lab_id();
        let dir = std::env::temp_dir().join(format!("sluice-lab-{pid}-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut lab = RoutedLab {
            cfg,
            id,
            bpffs: dir.join("bpffs"),
            dir,
            bpffs_mounted: false,
            namespaces: Vec::new(),
            servers: Vec::new(),
            stop_flags: Mutex::new(Vec::new()),
            config_seq: 0,
        };
        // On error `lab` is dropped here, which removes whatever was built.
        lab.setup()
            .with_context(|| format!("building routed lab {}", lab.id))?;
        Ok(lab)
    }

    pub fn client_ns(&self) -> String {
        format!("{}-c", self.id)
    }
    pub fn router_ns(&self) -> String {
        format!("{}-r", self.id)
    }
    pub fn lb_ns(&self, k: usize) -> String {
        format!("{}-lb{k}", self.id)
    }
    pub fn backend_ns(&self, i: usize) -> String {
        format!("{}-b{i}", self.id)
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    fn ip(&self, ns: &str, args: &[&str]) -> Result<Output> {
        cmd::run_ok(
            Command::new("ip").args(["-n", ns]).args(args),
            DEFAULT_TIMEOUT,
        )
    }

    pub fn exec_ok(&self, ns: &str, argv: &[&str]) -> Result<Output> {
        cmd::run_ok(
            Command::new("ip").args(["netns", "exec", ns]).args(argv),
            DEFAULT_TIMEOUT,
        )
    }

    /// A veth from bridge `bridge` of the router to `ns` (named eth0/eth1 there), checksum
    /// offload off on both ends, with the given addresses (no DAD) and MTU.
    fn wire(
        &self,
        bridge: &str,
        port: &str,
        ns: &str,
        ifname: &str,
        addrs: &[String],
        mtu: u32,
    ) -> Result<()> {
        let r = self.router_ns();
        let mtu = mtu.to_string();
        self.ip(
            &r,
            &[
                "link", "add", port, "mtu", &mtu, "type", "veth", "peer", "name", ifname, "mtu",
                &mtu, "netns", ns,
            ],
        )?;
        self.ip(&r, &["link", "set", port, "master", bridge])?;
        self.exec_ok(&r, &["ethtool", "-K", port, "tx", "off", "gro", "on"])?;
        self.exec_ok(ns, &["ethtool", "-K", ifname, "tx", "off"])?;
        for a in addrs {
            if a.contains(':') {
                self.ip(ns, &["addr", "add", a, "dev", ifname, "nodad"])?;
            } else {
                self.ip(ns, &["addr", "add", a, "dev", ifname])?;
            }
        }
        self.ip(&r, &["link", "set", port, "up"])?;
        self.ip(ns, &["link", "set", ifname, "up"])?;
        Ok(())
    }

    fn setup(&mut self) -> Result<()> {
        fs::create_dir_all(&self.bpffs)?;
        cmd::sh(&["mount", "-t", "bpf", "bpf", &self.bpffs.to_string_lossy()])?;
        self.bpffs_mounted = true;

        let mut all = vec![self.router_ns(), self.client_ns()];
        all.extend((0..self.cfg.lbs).map(|k| self.lb_ns(k)));
        all.extend((0..self.cfg.backends).map(|i| self.backend_ns(i)));
        for ns in &all {
            cmd::sh(&["ip", "netns", "add", ns])?;
            self.namespaces.push(ns.clone());
            self.ip(ns, &["link", "set", "lo", "up"])?;
            cmd::sysctl_in(
                ns,
                &[
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                ],
            )?;
        }
        let r = self.router_ns();
        cmd::sysctl_in(
            &r,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;
        let egress_mtu = self.cfg.lb_egress_mtu.to_string();
        for (bridge, v4, v6, mtu) in [
            ("brA", "10.1.0.254/24", "fd00:a::fe/64", "1500"),
            ("brB", "10.2.0.254/24", "fd00:b::fe/64", "1500"),
            ("brC", "10.3.0.254/24", "fd00:c::fe/64", egress_mtu.as_str()),
        ] {
            self.ip(&r, &["link", "add", bridge, "mtu", mtu, "type", "bridge"])?;
            self.ip(&r, &["link", "set", bridge, "up"])?;
            self.ip(&r, &["addr", "add", v4, "dev", bridge])?;
            self.ip(&r, &["addr", "add", v6, "dev", bridge, "nodad"])?;
        }

        let c = self.client_ns();
        self.wire(
            "brA",
            "c",
            &c,
            NS_IFACE,
            &[format!("{CLIENT4}/24"), format!("{CLIENT6}/64")],
            1500,
        )?;
        self.ip(&c, &["route", "add", "default", "via", "10.1.0.254"])?;
        self.ip(&c, &["-6", "route", "add", "default", "via", "fd00:a::fe"])?;
        cmd::sysctl_in(
            &c,
            &[
                "net.ipv4.fib_multipath_hash_policy=1",
                "net.ipv6.fib_multipath_hash_policy=1",
            ],
        )?;

        for k in 0..self.cfg.lbs {
            let lb = self.lb_ns(k);
            self.wire(
                "brA",
                &format!("lb{k}a"),
                &lb,
                NS_IFACE,
                &[format!("{}/24", lb_addr4(k)), format!("{}/64", lb_addr6(k))],
                1500,
            )?;
            self.wire(
                "brC",
                &format!("lb{k}c"),
                &lb,
                "eth1",
                &[
                    format!("10.3.0.{}/24", 2 + k),
                    format!("fd00:c::{}/64", 2 + k),
                ],
                self.cfg.lb_egress_mtu,
            )?;
            self.ip(
                &lb,
                &[
                    "route",
                    "add",
                    "10.2.0.0/24",
                    "via",
                    "10.3.0.254",
                    "dev",
                    "eth1",
                ],
            )?;
            self.ip(
                &lb,
                &[
                    "-6",
                    "route",
                    "add",
                    "fd00:b::/64",
                    "via",
                    "fd00:c::fe",
                    "dev",
                    "eth1",
                ],
            )?;
            // Only XDP may move VIP packets on.
            cmd::sysctl_in(
                &lb,
                &["net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0"],
            )?;
            // XDP_TX (ICMP answers) and XDP_REDIRECT (to eth1) land on the router-side peers,
            // which a veth only delivers with an XDP program there.
            for port in [format!("lb{k}a"), format!("lb{k}c")] {
                self.sluice_in(&r, "peer", &["xdp-pass", "--iface", &port])?;
            }
        }
        self.route_vip_via(&(0..self.cfg.lbs).collect::<Vec<_>>())?;

        let allow: Vec<String> = (0..2)
            .flat_map(|k| {
                let (v4, v6) = encap_prefixes(k);
                ["--allow".to_owned(), v4, "--allow".to_owned(), v6]
            })
            .collect();
        for i in 0..self.cfg.backends {
            let b = self.backend_ns(i);
            self.wire(
                "brB",
                &format!("b{i}"),
                &b,
                NS_IFACE,
                &[
                    format!("{}/24", backend_addr4(i)),
                    format!("{}/64", backend_addr6(i)),
                ],
                1500,
            )?;
            self.ip(&b, &["route", "add", "default", "via", "10.2.0.254"])?;
            self.ip(&b, &["-6", "route", "add", "default", "via", "fd00:b::fe"])?;
            self.ip(&b, &["addr", "add", &format!("{VIP4}/32"), "dev", "lo"])?;
            self.ip(
                &b,
                &["addr", "add", &format!("{VIP6}/128"), "dev", "lo", "nodad"],
            )?;
            let servers = BackendServers::start_with(
                &b,
                &format!("b{i}"),
                &[
                    backend_addr4(i).into(),
                    backend_addr6(i).into(),
                    VIP4.into(),
                    VIP6.into(),
                ],
            )?;
            self.servers.push(servers);
            let mut args = vec!["decap", "--iface", NS_IFACE];
            args.extend(allow.iter().map(String::as_str));
            self.sluice_in(&b, &format!("b{i}"), &args)?;
        }
        Ok(())
    }

    /// Runs `sluice --pin-dir <bpffs>/<pins> ARGS` in `ns`, failing with its output unless it
    /// exits 0.
    pub fn sluice_in(&self, ns: &str, pins: &str, args: &[&str]) -> Result<Output> {
        let out = cmd::run(
            Command::new("ip")
                .args(["netns", "exec", ns])
                .arg(sluice_binary()?)
                .arg("--pin-dir")
                .arg(self.bpffs.join(pins))
                .args(args),
            SLUICE_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "`sluice {}` in {ns} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// `sluice ... -o json` on load balancer k, parsed.
    pub fn lb_json(&self, k: usize, args: &[&str]) -> Result<serde_json::Value> {
        let mut argv = args.to_vec();
        argv.extend(["--iface", NS_IFACE, "-o", "json"]);
        let out = self.sluice_in(&self.lb_ns(k), &format!("lb{k}"), &argv)?;
        serde_json::from_slice(&out.stdout).context("parsing sluice's JSON")
    }

    /// The decapsulator counters of backend i.
    pub fn decap_json(&self, i: usize) -> Result<serde_json::Value> {
        let out = self.sluice_in(
            &self.backend_ns(i),
            &format!("b{i}"),
            &["inspect", "decap", "--iface", NS_IFACE, "-o", "json"],
        )?;
        serde_json::from_slice(&out.stdout).context("parsing sluice's JSON")
    }

    /// The client's route to both VIPs: through the listed load balancers (ECMP when several).
    pub fn route_vip_via(&self, lbs: &[usize]) -> Result<()> {
        let c = self.client_ns();
        for (family, vip, gateway) in [
            (
                "-4",
                format!("{VIP4}/32"),
                lbs.iter()
                    .map(|&k| lb_addr4(k).to_string())
                    .collect::<Vec<_>>(),
            ),
            (
                "-6",
                format!("{VIP6}/128"),
                lbs.iter().map(|&k| lb_addr6(k).to_string()).collect(),
            ),
        ] {
            let mut args = vec![family, "route", "replace", vip.as_str()];
            for gw in &gateway {
                if gateway.len() > 1 {
                    args.push("nexthop");
                }
                args.extend(["via", gw.as_str(), "dev", NS_IFACE]);
            }
            self.ip(&c, &args)?;
        }
        Ok(())
    }

    /// The config of load balancer k: tcp/7000 (echo) and udp/5353 on both VIPs, `mode: ipip`,
    /// every listed backend node (its family's address). A new file per call.
    pub fn write_config(&mut self, k: usize, backends: &[usize]) -> Result<PathBuf> {
        let (v4, v6) = encap_prefixes(k);
        let mut y = format!("encap_source_v4: {v4}\nencap_source_v6: {v6}\nvips:\n");
        for (vip, v6) in [(IpAddr::V4(VIP4), false), (IpAddr::V6(VIP6), true)] {
            for (port, proto) in [(ECHO_PORT, "tcp"), (UDP_PORT, "udp")] {
                writeln!(
                    y,
                    "  - address: {vip}\n    port: {port}\n    protocol: {proto}\n    mode: ipip\n    backends:"
                )?;
                for &i in backends {
                    let addr: IpAddr = if v6 {
                        backend_addr6(i).into()
                    } else {
                        backend_addr4(i).into()
                    };
                    writeln!(y, "      - address: {addr}")?;
                }
            }
        }
        self.config_seq += 1;
        let path = self
            .dir
            .join(format!("lb{k}-config-{}.yaml", self.config_seq));
        fs::write(&path, y).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Starts `sluice run` on load balancer k with `config` and waits until its XDP program is
    /// attached.
    pub fn run_sluice(&self, k: usize, config: &Path) -> Result<SluiceProcess> {
        let lb = self.lb_ns(k);
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &lb])
            .arg(sluice_binary()?)
            .arg("--pin-dir")
            .arg(self.bpffs.join(format!("lb{k}")))
            .args(["run", "--config"])
            .arg(config)
            .args(["--iface", NS_IFACE]);
        let log = self
            .dir
            .join(format!("sluice-lb{k}-{}.log", self.config_seq));
        let mut p = SluiceProcess::spawn(c, log)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = p.try_wait()? {
                bail!(
                    "`{}` exited early ({status}): {}",
                    p.what(),
                    p.log_text().trim()
                );
            }
            let link = self.ip(&lb, &["-j", "link", "show", NS_IFACE])?;
            if String::from_utf8_lossy(&link.stdout).contains("\"xdp\"") {
                return Ok(p);
            }
            if Instant::now() >= deadline {
                bail!(
                    "`{}`: no XDP program after 60 s; log: {}",
                    p.what(),
                    p.log_text().trim()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `n` UDP requests from the client to `vip`:5353 from distinct source ports; each answer
    /// is the name of the backend that got it (None: no answer within 1 s).
    pub fn udp_vip(&self, vip: IpAddr, n: u16, first_port: u16) -> Result<Vec<Option<String>>> {
        netns::run_in(&self.client_ns(), move || {
            let mut answers = Vec::new();
            for port in first_port..first_port + n {
                let bind: SocketAddr = if vip.is_ipv4() {
                    (Ipv4Addr::UNSPECIFIED, port).into()
                } else {
                    (Ipv6Addr::UNSPECIFIED, port).into()
                };
                let sock = UdpSocket::bind(bind).with_context(|| format!("bind {bind}"))?;
                sock.set_read_timeout(Some(Duration::from_secs(1)))?;
                sock.send_to(b"who?", (vip, UDP_PORT))?;
                let mut buf = [0u8; 256];
                answers.push(
                    sock.recv_from(&mut buf)
                        .ok()
                        .map(|(len, _)| String::from_utf8_lossy(&buf[..len]).into_owned()),
                );
            }
            Ok(answers)
        })
    }

    /// A long-lived echo connection from the client to `vip`:7000, a line every 100 ms.
    pub fn long_conn(&self, vip: IpAddr) -> Result<LongConn> {
        let flag = Arc::new(AtomicBool::new(false));
        if let Ok(mut flags) = self.stop_flags.lock() {
            flags.push(flag.clone());
        }
        LongConn::open(
            &self.client_ns(),
            SocketAddr::new(vip, ECHO_PORT),
            Duration::from_millis(100),
            Duration::from_secs(300),
            flag,
        )
    }

    /// Sends one line of `len` bytes to `vip`:7000 and reads its echo back: a bulk transfer
    /// whose full-size segments must cross the encapsulated path. Returns the echo's length.
    pub fn bulk_echo(&self, vip: IpAddr, len: usize) -> Result<usize> {
        netns::run_in(&self.client_ns(), move || {
            use std::io::{BufRead, BufReader, Write};
            let target = SocketAddr::new(vip, ECHO_PORT);
            let stream = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
                .with_context(|| format!("connect to {target}"))?;
            stream.set_read_timeout(Some(Duration::from_secs(20)))?;
            let mut line = vec![b'x'; len];
            line.push(b'\n');
            let mut writer = stream.try_clone()?;
            let sender = thread::spawn(move || writer.write_all(&line));
            let mut echo = String::new();
            BufReader::new(stream)
                .read_line(&mut echo)
                .with_context(|| format!("reading the echo of {len} bytes from {target}"))?;
            sender
                .join()
                .map_err(|_| anyhow::anyhow!("the sender panicked"))?
                .context("sending the bulk line")?;
            Ok(echo.trim_end().len())
        })
    }

    fn teardown(&mut self) {
        if let Ok(flags) = self.stop_flags.lock() {
            for f in flags.iter() {
                f.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        for s in &mut self.servers {
            s.stop();
        }
        self.servers.clear();
        remove_lab(
            &self.id,
            &mut self.namespaces,
            &self.bpffs,
            &mut self.bpffs_mounted,
            &self.dir,
        );
    }
}

impl Drop for RoutedLab {
    fn drop(&mut self) {
        self.teardown();
    }
}
