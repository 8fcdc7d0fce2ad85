//! The load balancers compared, each set up in the lab's lb namespace in turn and removed again
//! (Drop) before the next: sluice, iptables and nft DNAT (kube-proxy's two modes), nginx
//! `stream` and haproxy `mode tcp`. IPVS (kube-proxy's third mode) is not in this kernel.
//!
//! Every contender serves the same two services on the lab's VIP: TCP 80 (the backends' nginx)
//! and UDP 5353 (the packet-rate test; the backends count and drop it at ingress).
//!
//! DNAT: the lb forwards (ip_forward=1) and also masquerades, as kube-proxy does for traffic
//! from outside the node: a backend answers its source address, so without SNAT the replies
//! would go straight to the client from the backend's address, which the client drops.
//! The proxies listen on the VIP (on the lb's lo) and connect to the backends from a source
//! address of their own (so the TIME_WAIT sockets one leaves do not count against the next).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sluice_tests::{BackendSpec, HTTP_PORT, Lab, UDP_PORT, cmd, netns};

/// The lb's ephemeral port range during the benchmark: small, so that a proxy's port exhaustion
/// shows within a bounded run (1000 ports x backends 4-tuples, each held 60 s in TIME_WAIT).
pub const LB_PORT_RANGE: (u16, u16) = (40000, 40999);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Sluice,
    Iptables,
    Nft,
    Nginx,
    Haproxy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Sluice,
        Kind::Iptables,
        Kind::Nft,
        Kind::Nginx,
        Kind::Haproxy,
    ];

    /// Short, stable key (JSON).
    pub fn key(self) -> &'static str {
        match self {
            Kind::Sluice => "sluice",
            Kind::Iptables => "iptables",
            Kind::Nft => "nft",
            Kind::Nginx => "nginx",
            Kind::Haproxy => "haproxy",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Sluice => "sluice (XDP, L2 DSR)",
            Kind::Iptables => "iptables DNAT (statistic random)",
            Kind::Nft => "nft DNAT (numgen random)",
            Kind::Nginx => "nginx stream",
            Kind::Haproxy => "haproxy mode tcp",
        }
    }

    /// haproxy has no UDP (only its enterprise edition does).
    pub fn forwards_udp(self) -> bool {
        self != Kind::Haproxy
    }

    /// Whether it terminates the client's connection and opens its own to a backend.
    pub fn is_proxy(self) -> bool {
        matches!(self, Kind::Nginx | Kind::Haproxy)
    }
}

/// Sysctls and offloads the whole benchmark uses (the namespaces go with the lab).
pub fn tune_lab(lab: &Lab) -> anyhow::Result<()> {
    let range = format!(
        "net.ipv4.ip_local_port_range={} {}",
        LB_PORT_RANGE.0, LB_PORT_RANGE.1
    );
    sysctl(lab, lab.lb_ns(), &[&range])?;
    // The client must not be what runs out of ports: every contender's connections start there.
    sysctl(
        lab,
        lab.client_ns(),
        &[
            "net.ipv4.ip_local_port_range=1024 65000",
            "net.ipv4.tcp_tw_reuse=1",
        ],
    )?;
    sluice_tests::pktgen::prepare_client(lab)?;
    // XDP_TX out of the lb's veth needs an XDP program on its peer (sluice's lab helper puts an
    // XDP_PASS one there); the packet-rate test swaps its counter into that link.
    lab.ensure_peer_xdp()?;
    // Likewise the lb's veth, for frames injected into its port (NICs have GRO on by default).
    lab.exec_ok(lab.lb_ns(), &["ethtool", "-K", lab.lb_iface(), "gro", "on"])?;
    Ok(())
}

/// What the report says about the lab's setup.
pub fn lab_notes(lab: &Lab) -> Vec<String> {
    let ports = u32::from(LB_PORT_RANGE.1 - LB_PORT_RANGE.0) + 1;
    vec![
        format!(
            "lab: client, lb and {} backends (nginx, 1 worker each) in network namespaces on one \
             bridge, veth links, all on this host",
            lab.backends()
        ),
        format!(
            "lb namespace: net.ipv4.ip_local_port_range = {lo} {hi} ({ports} ports; the default \
             has 28232), so that a proxy's ephemeral-port exhaustion shows within a bounded run; \
             client namespace: tcp_tw_reuse=1 and ports 1024-65000, so the client itself never \
             runs out",
            lo = LB_PORT_RANGE.0,
            hi = LB_PORT_RANGE.1,
            ports = ports,
        ),
        format!(
            "why the proxies fall over: the client closes first, so the proxy closes its upstream \
             connection first and that socket holds its source port for 60 s in TIME_WAIT. A \
             proxy can use {ports} ports x {n} backends = {tuples} (source port, backend) pairs: \
             the first {tuples} connections within a minute pass, then at most {sustained} new \
             connections/s. With the default range the same wall stands at 28232 x {n} / 60 = \
             {default_sustained} new connections/s: the seeds' failure, in small. sluice and \
             DNAT open no connection, so they have no such wall",
            tuples = ports * lab.backends() as u32,
            n = lab.backends(),
            sustained = ports * lab.backends() as u32 / 60,
            default_sustained = 28232 * lab.backends() as u32 / 60,
        ),
        "IPVS (kube-proxy's ipvs mode) is not measured: this kernel has no IPVS (ip_vs) support"
            .into(),
        "haproxy has no UDP load balancing (mode tcp/http only): no packet-rate figure".into(),
        "DNAT contenders masquerade (SNAT to the lb) so that replies return through the lb, as \
         kube-proxy does for external traffic; sluice replies go straight from the backends \
         (direct server return)"
            .into(),
    ]
}

fn sysctl(lab: &Lab, ns: &str, settings: &[&str]) -> anyhow::Result<()> {
    let mut argv = vec!["sysctl", "-q", "-w"];
    argv.extend_from_slice(settings);
    lab.exec_ok(ns, &argv)?;
    Ok(())
}

/// A contender set up in the lb namespace; removed on drop.
pub struct Active<'a> {
    lab: &'a Lab,
    pub kind: Kind,
    /// The proxy process (nginx master or haproxy), if any.
    child: Option<Child>,
    /// The proxy's log, searched for port exhaustion.
    log: Option<PathBuf>,
    /// Commands (in the lb namespace) that undo the setup, run in reverse order.
    undo: Vec<Vec<String>>,
}

impl Active<'_> {
    /// How many times the proxy logged that it could not get a source port (EADDRNOTAVAIL);
    /// None for the contenders that open no connection.
    pub fn port_errors(&self) -> Option<u64> {
        self.log_lines(&["Cannot assign requested address", "no free ports"])
    }

    /// How many times the proxy logged that it had no backend left to try (it marks backends
    /// down after failed connects, here caused by the port exhaustion).
    pub fn no_backend_errors(&self) -> Option<u64> {
        self.log_lines(&["no live upstreams", "no server available"])
    }

    fn log_lines(&self, patterns: &[&str]) -> Option<u64> {
        let log = self.log.as_ref()?;
        let text = fs::read_to_string(log).unwrap_or_default();
        Some(
            text.lines()
                .filter(|l| patterns.iter().any(|p| l.contains(p)))
                .count() as u64,
        )
    }

    /// CPU time (user + system, ns) used so far by the processes in the lb namespace (the
    /// proxies; 0 for the others, whose work happens in the kernel's softirq).
    pub fn process_cpu_ns(&self) -> u64 {
        lb_process_cpu_ns(self.lab)
    }
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            cmd::terminate(c, Duration::from_secs(5));
        }
        if self.kind == Kind::Sluice
            && let Err(e) = self.lab.detach()
        {
            eprintln!("[bench] sluice detach: {e:#}");
        }
        for argv in self.undo.iter().rev() {
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            if let Err(e) = self.lab.exec_ok(self.lab.lb_ns(), &argv) {
                eprintln!("[bench] undoing {}: {e:#}", self.kind.name());
            }
        }
    }
}

/// Sets up `kind` in the lb namespace and waits until it serves.
pub fn setup(lab: &Lab, kind: Kind) -> anyhow::Result<Active<'_>> {
    let mut a = Active {
        lab,
        kind,
        child: None,
        log: None,
        undo: Vec::new(),
    };
    let lb = lab.lb_ns();
    let vip = lab.vip();
    let strs = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    match kind {
        Kind::Sluice => {
            let specs: Vec<BackendSpec> = (0..lab.backends()).map(BackendSpec::active).collect();
            lab.attach(&specs)?;
        }
        Kind::Iptables | Kind::Nft => {
            // Entries left by the previous contender would keep its NAT decisions.
            flush_conntrack(lab);
            a.undo.push(strs(&["conntrack", "-F"]));
            a.undo
                .push(strs(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"]));
            a.undo.push(strs(&["nft", "flush", "ruleset"]));
            if kind == Kind::Iptables {
                for argv in iptables_rules(lab) {
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    lab.exec_ok(lb, &argv)?;
                }
            } else {
                let path = lab.dir().join("bench-nft.conf");
                fs::write(&path, nft_ruleset(lab))?;
                lab.exec_ok(lb, &["nft", "-f", &path.to_string_lossy()])?;
            }
            sysctl(lab, lb, &["net.ipv4.ip_forward=1"])?;
        }
        Kind::Nginx | Kind::Haproxy => {
            let vip32 = format!("{vip}/32");
            lab.exec_ok(lb, &["ip", "addr", "add", &vip32, "dev", "lo"])?;
            a.undo
                .push(strs(&["ip", "addr", "del", &vip32, "dev", "lo"]));
            let src = proxy_source(lab, kind);
            let src24 = format!("{src}/24");
            lab.exec_ok(lb, &["ip", "addr", "add", &src24, "dev", lab.lb_iface()])?;
            a.undo
                .push(strs(&["ip", "addr", "del", &src24, "dev", lab.lb_iface()]));
            let dir = lab.dir().join(format!("bench-{}", kind.key()));
            fs::create_dir_all(&dir)?;
            let log = dir.join("proxy.log");
            let (conf_name, conf, argv) = if kind == Kind::Nginx {
                let conf = nginx_conf(lab, &dir, src);
                let c = dir.join("nginx.conf");
                let argv = vec![
                    "nginx".to_string(),
                    "-p".into(),
                    format!("{}/", dir.display()),
                    "-c".into(),
                    c.display().to_string(),
                    "-e".into(),
                    log.display().to_string(),
                ];
                ("nginx.conf", conf, argv)
            } else {
                let conf = haproxy_conf(lab, src);
                let c = dir.join("haproxy.cfg");
                let argv = vec![
                    "haproxy".to_string(),
                    "-db".into(),
                    "-f".into(),
                    c.display().to_string(),
                ];
                ("haproxy.cfg", conf, argv)
            };
            fs::write(dir.join(conf_name), conf)?;
            let out = fs::File::create(&log)?;
            let child = Command::new("ip")
                .args(["netns", "exec", lb])
                .args(&argv)
                .stdin(Stdio::null())
                .stdout(out.try_clone()?)
                .stderr(out)
                .spawn()
                .with_context(|| format!("starting {}", argv[0]))?;
            a.child = Some(child);
            a.log = Some(log);
            a.wait_listening()?;
        }
    }
    Ok(a)
}

impl Active<'_> {
    /// Waits (at most 10 s) until VIP:80 accepts connections inside the lb namespace.
    fn wait_listening(&mut self) -> anyhow::Result<()> {
        let addr = SocketAddr::V4(SocketAddrV4::new(self.lab.vip(), HTTP_PORT));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(c) = &mut self.child
                && let Some(status) = c.try_wait()?
            {
                let log = self
                    .log
                    .as_ref()
                    .and_then(|l| fs::read_to_string(l).ok())
                    .unwrap_or_default();
                bail!("{} exited ({status}): {}", self.kind.name(), log.trim());
            }
            let up = netns::run_in(self.lab.lb_ns(), move || {
                Ok(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            })?;
            if up {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{} does not listen on {addr} after 10 s", self.kind.name());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn flush_conntrack(lab: &Lab) {
    // Exit status 1 just means "nothing to flush" on some versions.
    let _ = lab.exec(lab.lb_ns(), &["conntrack", "-F"]);
}

/// The source address a proxy connects to the backends from (one per proxy).
fn proxy_source(lab: &Lab, kind: Kind) -> Ipv4Addr {
    let o = lab.lb_addr().octets();
    let last = if kind == Kind::Nginx { 3 } else { 4 };
    Ipv4Addr::new(o[0], o[1], o[2], last)
}

/// kube-proxy's iptables mode in small: a service chain that jumps to endpoint i with
/// probability 1/(n - i) (so each gets 1/n), DNAT there, masquerade on the way out.
fn iptables_rules(lab: &Lab) -> Vec<Vec<String>> {
    let n = lab.backends();
    let mut rules = Vec::new();
    let r = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    for (proto, port, chain) in [
        ("tcp", HTTP_PORT, "SLUICE-SVC-TCP"),
        ("udp", UDP_PORT, "SLUICE-SVC-UDP"),
    ] {
        rules.push(r(&format!("iptables -t nat -N {chain}")));
        for i in 0..n {
            let to = format!("{}:{port}", lab.backend_addr(i));
            let stat = if i + 1 < n {
                format!(
                    "-m statistic --mode random --probability {:.10}",
                    1.0 / (n - i) as f64
                )
            } else {
                String::new()
            };
            rules.push(r(&format!(
                "iptables -t nat -A {chain} -p {proto} {stat} -j DNAT --to-destination {to}"
            )));
        }
        rules.push(r(&format!(
            "iptables -t nat -A PREROUTING -d {}/32 -p {proto} --dport {port} -j {chain}",
            lab.vip()
        )));
    }
    rules.push(r(
        "iptables -t nat -A POSTROUTING -m conntrack --ctstate DNAT -j MASQUERADE",
    ));
    rules
}

/// kube-proxy's nftables mode in small: `numgen random mod N` into a map of endpoints.
fn nft_ruleset(lab: &Lab) -> String {
    // Same port on the backends: DNAT to the address keeps it.
    let map = (0..lab.backends())
        .map(|i| format!("{i} : {}", lab.backend_addr(i)))
        .collect::<Vec<_>>()
        .join(", ");
    let n = lab.backends();
    format!(
        "table ip sluicebench {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {vip} tcp dport {HTTP_PORT} dnat to numgen random mod {n} map {{ {map} }}
    ip daddr {vip} udp dport {UDP_PORT} dnat to numgen random mod {n} map {{ {map} }}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ct status dnat masquerade
  }}
}}
",
        vip = lab.vip(),
    )
}

/// nginx `stream`: TCP 80 and UDP 5353 (no responses expected), round robin, as many workers as
/// cores (ingress-nginx's `worker_processes auto`).
fn nginx_conf(lab: &Lab, dir: &std::path::Path, src: Ipv4Addr) -> String {
    let servers = |port: u16| {
        (0..lab.backends())
            .map(|i| format!("        server {}:{port};\n", lab.backend_addr(i)))
            .collect::<String>()
    };
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile 16384;
pid {dir}/nginx.pid;
events {{ worker_connections 8000; }}
stream {{
    upstream http_backends {{
{tcp}    }}
    upstream udp_backends {{
{udp}    }}
    server {{
        listen {vip}:{HTTP_PORT} backlog=4096;
        proxy_pass http_backends;
        proxy_bind {src};
        proxy_connect_timeout 2s;
        proxy_timeout 10s;
    }}
    server {{
        listen {vip}:{UDP_PORT} udp;
        proxy_pass udp_backends;
        proxy_bind {src};
        proxy_responses 0;
        proxy_timeout 1s;
    }}
}}
",
        dir = dir.display(),
        tcp = servers(HTTP_PORT),
        udp = servers(UDP_PORT),
        vip = lab.vip(),
    )
}

/// haproxy `mode tcp`, round robin, one thread per core (its default).
fn haproxy_conf(lab: &Lab, src: Ipv4Addr) -> String {
    let servers = (0..lab.backends())
        .map(|i| format!("    server b{i} {}:{HTTP_PORT}\n", lab.backend_addr(i)))
        .collect::<String>();
    format!(
        "global
    # 2 fds per connection; this machine's hard limit is 20000 descriptors.
    maxconn 9000
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
frontend vip
    bind {vip}:{HTTP_PORT} backlog 4096
    default_backend backends
backend backends
    balance roundrobin
    source {src}
{servers}",
        vip = lab.vip(),
    )
}

/// Sum of utime + stime (ns) of every process in the lb namespace.
fn lb_process_cpu_ns(lab: &Lab) -> u64 {
    let pids = cmd::run(
        Command::new("ip").args(["netns", "pids", lab.lb_ns()]),
        Duration::from_secs(10),
    )
    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.split_whitespace()
        .filter_map(|p| fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After "pid (comm)": state is field 0, utime 11, stime 12.
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks * 1_000_000_000 / hz)
        })
        .sum()
}

/// What the lb namespace looks like (for a failed measurement's message).
pub fn lb_diagnostics(lab: &Lab) -> String {
    let mut out = String::new();
    for argv in [
        &[
            "ip",
            "-s",
            "link",
            "show",
            "dev",
            sluice_tests::lab::NS_IFACE,
        ][..],
        &["ip", "neigh"],
        &["conntrack", "-C"],
        &[
            "nstat",
            "-az",
            "IpExtInNoRoutes",
            "IpInAddrErrors",
            "IpOutNoRoutes",
            "IpForwDatagrams",
            "IpInDiscards",
            "TcpExtListenOverflows",
            "TcpExtListenDrops",
        ],
        &["sysctl", "net.ipv4.ip_forward"],
    ] {
        let text = lab
            .exec(lab.lb_ns(), argv)
            .map(|o| {
                String::from_utf8_lossy(&o.stdout).into_owned()
                    + &String::from_utf8_lossy(&o.stderr)
            })
            .unwrap_or_else(|e| format!("{e:#}"));
        out.push_str(&format!("$ {}\n{}\n", argv.join(" "), text.trim()));
    }
    for argv in [
        &["ip", "-s", "link"][..],
        &["bridge", "fdb", "show", "br", "br0"],
    ] {
        let text = lab
            .exec(lab.switch_ns(), argv)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_else(|e| format!("{e:#}"));
        out.push_str(&format!("(switch) $ {}\n{}\n", argv.join(" "), text.trim()));
    }
    out
}
