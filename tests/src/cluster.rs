//! A real multi-node Kubernetes cluster on this one machine, for deploying sluice exactly as its
//! users do (`kubectl apply -k deploy/overlays/...`) and sending real connections through it.
//!
//! ```text
//!   client ─┐                       switch namespace: bridge br0, one port per namespace
//!   cp ─────┤ br0 (10.80.0.0/24)    cp: etcd, kube-apiserver, controller-manager, scheduler
//!   node-0 ─┤                       node-i: its own network AND mount namespace, running its
//!   node-1 ─┤                         containerd, kubelet and kube-proxy; its interface on the
//!   node-2 ─┘                         bridge (eth0, or a name per node), pods on 10.244.i.0/24
//! ```
//!
//! Every node is a network namespace (its interface on the bridge, routes to the other nodes'
//! pod CIDRs) and a mount namespace of its own, in which the node's bpffs is mounted on /sys/fs/bpf
//! (so the agents' pins do not meet, as on separate machines) and tmpfs over /run/containerd,
//! /run/netns and /var/lib/cni (containerd's and the CNI plugins' state). Its daemons are started
//! with `nsenter --mount --net` (not `ip netns exec`, whose private /sys would hide the cgroups).
//! The kubelets run with a `cgroupRoot` each; containerd with `restrict_oom_score_adj` (no
//! CAP_SYS_RESOURCE here). Images are imported offline into each node's containerd.
//!
//! Kubernetes 1.20 (the only one that builds here) serves EndpointSlice as v1beta1 only, and the
//! agent reads v1: the API server runs with v1beta1 off and a CRD serving the slices as v1 and
//! v1beta1 (see [`crate::kube`]), the EndpointSlice controllers are off, and this harness keeps
//! the slices in step with Endpoints and Pods (ready, serving, terminating; one slice per family
//! of a Service), as the EndpointSlice controller of a current cluster does. The agents read
//! them as v1, kube-proxy as v1beta1.
//!
//! Dual-stack throughout (1.20: the `IPv6DualStack` feature gate on the API server,
//! controller-manager, kubelets and kube-proxies): the segment also has fd80::/64 (client ::1,
//! control plane ::2, node i ::10+i hex), node i's pods also fd44:0:0:i::/64, each kubelet
//! `--node-ip=<IPv4>,<IPv6>` (a Node InternalIP of each family), each kube-proxy an iptables and
//! an ip6tables proxier. Services are IPv4 unless they ask for IPv6 (`ipFamilies`).
//!
//! Nodes' interfaces are `eth0` unless [`Cluster::start_with_node_ifaces`] names them per node
//! (`eno1`, `enp3s0`, ...: as on a real cluster, where the agents' `--iface auto` must find each
//! one by the Node's InternalIP).
//!
//! The host network namespace is not touched: the bridge is in a namespace of its own. Host-wide
//! state the kubelet writes (vm.overcommit_memory, kernel.panic, kernel.panic_on_oops) is saved
//! and restored; cgroups, mounts, namespaces, processes are removed on drop, and a later run
//! removes what a killed one left (names carry the pid). One cluster at a time per machine (a
//! lock file): each takes ~1 GB and much of two cores.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::{Value, json};

use crate::cmd::{self, DEFAULT_TIMEOUT};
use crate::conn::LongConn;
use crate::image;
use crate::kube::Kube;
use crate::lab::{
    kill_ns_processes, remove_dead_namespaces, sluice_binary, temp_dir_pid, unmount,
    unmount_dead_temp_dirs,
};

/// The segment's /24: client .1, control plane .2, node i .10+i.
const NET: [u8; 3] = [10, 80, 0];
/// The pods of node i: 10.244.i.0/24.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The segment's IPv6 /64 (dual-stack): client ::1, control plane ::2, node i ::10+i (hex).
const NET6: u16 = 0xfd80;
/// The pods of node i, IPv6: fd44:0:0:i::/64.
pub const CLUSTER_CIDR6: &str = "fd44::/48";
/// The client's and control plane's interface on the bridge, and every node's unless
/// [`Cluster::start_with_node_ifaces`] names them.
pub const IFACE: &str = "eth0";
/// Interface names as a real cluster mixes them (onboard, PCI slot, classic): node i gets the
/// i-th (the cluster test's nodes).
pub const MIXED_IFACES: [&str; 3] = ["eno1", "enp3s0", "eth0"];
/// The pause image's reference (containerd's sandbox_image).
const PAUSE_IMAGE: &str = "localhost/sluice-test-pause:3.2";
/// Host-wide sysctls the kubelet sets on start; saved before and restored after.
const HOST_SYSCTLS: [&str; 3] = [
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
];
/// cgroup v1 hierarchies that get a cgroup root per node.
const CGROUP_V1: &str = "/sys/fs/cgroup";
/// The lock that keeps clusters one at a time.
const LOCK: &str = "/run/lock/sluice-cluster.lock";
/// How long nodes may take to become Ready.
const NODES_READY_TIMEOUT: Duration = Duration::from_secs(120);

static COUNTER: AtomicU32 = AtomicU32::new(0);
static STALE: Once = Once::new();

/// What to build.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// Worker nodes (every one runs pods and the DaemonSet).
    pub nodes: usize,
    /// OCI archives imported into every node's containerd besides the pause image.
    pub images: Vec<PathBuf>,
}

struct NodeState {
    name: String,
    ns: String,
    /// Its interface on the bridge.
    iface: String,
    /// Switch-side port of its interface.
    port: String,
    addr: Ipv4Addr,
    addr6: Ipv6Addr,
    dir: PathBuf,
    /// The file holding the node's mount namespace.
    mnt: PathBuf,
    mnt_bound: bool,
    cgroup_root: String,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    proxy: Option<Child>,
}

/// A running cluster. See the module documentation.
pub struct Cluster {
    id: String,
    dir: PathBuf,
    kube: Option<Arc<Kube>>,
    namespaces: Vec<String>,
    sw: String,
    cp: String,
    client: String,
    nodes: Vec<NodeState>,
    control: Vec<(String, Child)>,
    bpffs: PathBuf,
    bpffs_mounted: bool,
    saved_sysctls: Vec<(String, String)>,
    created_dirs: Vec<PathBuf>,
    mirror_stop: Arc<AtomicBool>,
    mirror: Option<JoinHandle<()>>,
    stop_flags: Vec<Arc<AtomicBool>>,
    started: Instant,
    _lock: fs::File,
}

fn node_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(NET[0], NET[1], NET[2], 10 + i as u8)
}

fn node_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(NET6, 0, 0, 0, 0, 0, 0, 0x10 + i as u16)
}

/// Node i's IPv6 pod range.
fn pod_cidr6(i: usize) -> String {
    format!("fd44:0:0:{i:x}::/64")
}

/// The client namespace's IPv6 address.
pub fn client_addr6() -> Ipv6Addr {
    Ipv6Addr::new(NET6, 0, 0, 0, 0, 0, 0, 1)
}

/// The control plane's IPv6 address.
pub fn cp_addr6() -> Ipv6Addr {
    Ipv6Addr::new(NET6, 0, 0, 0, 0, 0, 0, 2)
}

/// An IPv6 address on the segment that no namespace holds (for a VIP announced on the link).
pub fn on_link_vip6() -> Ipv6Addr {
    Ipv6Addr::new(NET6, 0, 0, 0, 0, 0, 0, 0x200)
}

/// The client namespace's address.
pub fn client_addr() -> Ipv4Addr {
    Ipv4Addr::new(NET[0], NET[1], NET[2], 1)
}

/// The control plane's address (the API server's advertised address).
pub fn cp_addr() -> Ipv4Addr {
    Ipv4Addr::new(NET[0], NET[1], NET[2], 2)
}

/// An address on the segment that no namespace holds (for a VIP announced on the link).
pub fn on_link_vip() -> Ipv4Addr {
    Ipv4Addr::new(NET[0], NET[1], NET[2], 200)
}

fn ip(ns: &str, args: &[&str]) -> Result<Output> {
    cmd::run_ok(
        Command::new("ip").args(["-n", ns]).args(args),
        DEFAULT_TIMEOUT,
    )
}

fn in_ns(ns: &str, argv: &[&str]) -> Result<Output> {
    cmd::run_ok(
        Command::new("ip").args(["netns", "exec", ns]).args(argv),
        DEFAULT_TIMEOUT,
    )
}

/// A cluster component (containerd, kubelet, kube-proxy) exited while the cluster came up.
#[derive(Debug)]
struct ComponentExited(String);

impl std::fmt::Display for ComponentExited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ComponentExited {}

/// Why a component's log says it exited: its first fatal line (klog's `F` lines, a Go
/// `panic:` or `fatal error:`, which a goroutine dump buries), then the log's last lines.
fn exit_reason(path: &Path) -> String {
    let log = fs::read_to_string(path).unwrap_or_default();
    let fatal = log.lines().find(|l| {
        l.starts_with("panic: ")
            || l.starts_with("fatal error: ")
            || (l.len() > 5
                && l.starts_with('F')
                && l.as_bytes()[1..5].iter().all(u8::is_ascii_digit))
    });
    format!(
        "{}\n... (last lines of {}:)\n{}",
        fatal.unwrap_or("no fatal line"),
        path.display(),
        tail(path, 12)
    )
}

fn tail(path: &Path, n: usize) -> String {
    let t = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Cluster {
    /// Builds and starts the whole cluster; nodes are Ready when it returns. Whatever was built
    /// is removed again on error. Every node's interface is [`IFACE`].
    pub fn start(cfg: ClusterConfig) -> Result<Cluster> {
        Self::start_with_node_ifaces(cfg, &[])
    }

    /// [`Cluster::start`] with node i's interface named `ifaces[i]` ([`IFACE`] past the end;
    /// at most 15 characters, as `ip link` takes).
    ///
    /// A component that exits while the cluster comes up (a kubelet crashed at start once in a
    /// full run: a Go runtime dump, sluice not yet deployed) gets one more bring-up from
    /// scratch; its reason is printed, and a second exit fails.
    pub fn start_with_node_ifaces(cfg: ClusterConfig, ifaces: &[&str]) -> Result<Cluster> {
        match Self::start_once(&cfg, ifaces) {
            Err(e) if e.chain().any(|cause| cause.is::<ComponentExited>()) => {
                eprintln!("the cluster did not come up, once more from scratch: {e:#}");
                Self::start_once(&cfg, ifaces)
            }
            started => started,
        }
    }

    fn start_once(cfg: &ClusterConfig, ifaces: &[&str]) -> Result<Cluster> {
        ensure!(
            (1..=20).contains(&cfg.nodes),
            "ClusterConfig.nodes must be 1 to 20"
        );
        for name in ifaces {
            ensure!(
                (1..=15).contains(&name.len())
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b)),
                // No '.': the name goes into sysctl keys (net.ipv4.conf.NAME.rp_filter).
                "interface name {name:?}: 1 to 15 of [A-Za-z0-9_-]"
            );
        }
        crate::lab::require_root();
        for tool in ["containerd", "ctr", "runc", "nsenter", "unshare", "buildah"] {
            ensure!(
                which(tool),
                "the cluster needs `{tool}` (containerd runc buildah util-linux; scripts/bootstrap.sh)"
            );
        }
        ensure!(
            Path::new("/usr/lib/cni/bridge").is_file(),
            "/usr/lib/cni/bridge missing: install containernetworking-plugins (scripts/bootstrap.sh)"
        );
        fs::create_dir_all("/run/lock")?;
        let lock = fs::File::create(LOCK)?;
        // SAFETY: flock on an fd we own; released when the file is closed (Cluster dropped).
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!("locking {LOCK}");
        }
        STALE.call_once(cleanup_stale);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let id = format!("slk{pid}");
        let dir = std::env::temp_dir().join(format!("sluice-cluster-{pid}-{n}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let nodes = (0..cfg.nodes)
            .map(|i| {
                let name = format!("node-{i}");
                let ndir = dir.join(&name);
                NodeState {
                    ns: format!("{id}-n{i}"),
                    iface: ifaces.get(i).copied().unwrap_or(IFACE).to_owned(),
                    port: format!("sw-n{i}"),
                    addr: node_addr(i),
                    addr6: node_addr6(i),
                    mnt: ndir.join("mnt.ns"),
                    mnt_bound: false,
                    cgroup_root: format!("{id}-n{i}"),
                    dir: ndir,
                    name,
                    containerd: None,
                    kubelet: None,
                    proxy: None,
                }
            })
            .collect();
        let mut c = Cluster {
            sw: format!("{id}-sw"),
            cp: format!("{id}-cp"),
            client: format!("{id}-c"),
            bpffs: dir.join("bpffs"),
            id,
            dir,
            kube: None,
            namespaces: Vec::new(),
            nodes,
            control: Vec::new(),
            bpffs_mounted: false,
            saved_sysctls: Vec::new(),
            created_dirs: Vec::new(),
            mirror_stop: Arc::new(AtomicBool::new(false)),
            mirror: None,
            stop_flags: Vec::new(),
            started: Instant::now(),
            _lock: lock,
        };
        c.setup(cfg)
            .with_context(|| format!("starting cluster {} (files in {})", c.id, c.dir.display()))?;
        eprintln!(
            "cluster {}: {} nodes Ready after {:.1} s",
            c.id,
            cfg.nodes,
            c.started.elapsed().as_secs_f64()
        );
        Ok(c)
    }

    fn setup(&mut self, cfg: &ClusterConfig) -> Result<()> {
        self.save_sysctls()?;
        self.network()?;
        // Images first (buildah, CPU-bound) while nothing else runs.
        let pause = image::build_pause_image(&crate::kube::binaries()?.join("pause"))?;
        let kube = Arc::new(Kube::start_cluster(&self.cp, cp_addr())?);
        self.kube = Some(kube.clone());
        // Names the advertised address, which the nodes reach over the segment.
        let kubeconfig = kube.admin_kubeconfig(0).to_owned();
        self.start_control_plane(&kube, &kubeconfig)?;
        let mut images = vec![pause];
        images.extend(cfg.images.iter().cloned());
        for i in 0..self.nodes.len() {
            self.start_containerd(i)?;
        }
        // Imports in parallel (ctr is mostly I/O), then the kubelets and proxies.
        let imports: Vec<_> = (0..self.nodes.len())
            .map(|i| {
                let (cmdv, images) = (self.node_cmd_prefix(i), images.clone());
                let sock = self.containerd_sock(i);
                thread::spawn(move || -> Result<()> {
                    for archive in &images {
                        let mut c = Command::new(&cmdv[0]);
                        c.args(&cmdv[1..])
                            .arg("ctr")
                            .arg("-a")
                            .arg(&sock)
                            .args(["-n", "k8s.io", "images", "import"])
                            .arg(archive);
                        cmd::run_ok(&mut c, Duration::from_secs(300))?;
                    }
                    Ok(())
                })
            })
            .collect();
        for (i, h) in imports.into_iter().enumerate() {
            h.join()
                .map_err(|_| anyhow!("image import thread panicked"))?
                .with_context(|| format!("importing images into {}", self.nodes[i].name))?;
        }
        for i in 0..self.nodes.len() {
            self.start_kubelet(i, &kubeconfig)?;
            self.start_proxy(i, &kubeconfig)?;
        }
        self.wait_nodes_ready()?;
        self.start_mirror();
        Ok(())
    }

    // ----- network -----

    fn network(&mut self) -> Result<()> {
        let mut all = vec![self.sw.clone(), self.cp.clone(), self.client.clone()];
        all.extend(self.nodes.iter().map(|n| n.ns.clone()));
        for ns in &all {
            cmd::sh(&["ip", "netns", "add", ns])?;
            self.namespaces.push(ns.clone());
            ip(ns, &["link", "set", "lo", "up"])?;
        }
        let sw = self.sw.clone();
        ip(&sw, &["link", "add", "br0", "type", "bridge"])?;
        ip(&sw, &["link", "set", "br0", "up"])?;
        let mut ends = vec![
            (
                self.client.clone(),
                IFACE.to_owned(),
                "sw-c".to_owned(),
                client_addr(),
                client_addr6(),
                1u8,
            ),
            (
                self.cp.clone(),
                IFACE.to_owned(),
                "sw-cp".to_owned(),
                cp_addr(),
                cp_addr6(),
                2,
            ),
        ];
        for (i, n) in self.nodes.iter().enumerate() {
            ends.push((
                n.ns.clone(),
                n.iface.clone(),
                n.port.clone(),
                n.addr,
                n.addr6,
                10 + i as u8,
            ));
        }
        for (ns, iface, port, addr, addr6, k) in &ends {
            let mac = format!("02:5c:50:00:00:{k:02x}");
            ip(
                &sw,
                &[
                    "link", "add", port, "type", "veth", "peer", "name", iface, "address", &mac,
                    "netns", ns,
                ],
            )?;
            ip(&sw, &["link", "set", port, "master", "br0"])?;
            // A veth that sends into a native XDP path must compute checksums itself.
            in_ns(&sw, &["ethtool", "-K", port, "tx", "off"])?;
            in_ns(ns, &["ethtool", "-K", iface, "tx", "off"])?;
            ip(ns, &["addr", "add", &format!("{addr}/24"), "dev", iface])?;
            // Dual-stack segment; nodad: usable at once, no duplicate detection to wait for.
            ip(
                ns,
                &["addr", "add", &format!("{addr6}/64"), "dev", iface, "nodad"],
            )?;
            ip(&sw, &["link", "set", port, "up"])?;
            ip(ns, &["link", "set", iface, "up"])?;
        }
        in_ns(
            &sw,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.default.rp_filter=0",
            ],
        )?;
        in_ns(
            &self.client,
            &[
                "sysctl",
                "-q",
                "-w",
                "net.ipv4.conf.all.rp_filter=0",
                "net.ipv4.conf.eth0.rp_filter=0",
                "net.ipv4.conf.all.accept_redirects=0",
                "net.ipv4.conf.eth0.accept_redirects=0",
            ],
        )?;
        for (i, n) in self.nodes.iter().enumerate() {
            let iface = n.iface.as_str();
            in_ns(
                &n.ns,
                &[
                    "sysctl",
                    "-q",
                    "-w",
                    "net.ipv4.ip_forward=1",
                    "net.ipv4.conf.all.rp_filter=0",
                    "net.ipv4.conf.default.rp_filter=0",
                    &format!("net.ipv4.conf.{iface}.rp_filter=0"),
                    // Forwarded traffic leaves by the port it came in on: no redirects.
                    "net.ipv4.conf.all.send_redirects=0",
                    &format!("net.ipv4.conf.{iface}.send_redirects=0"),
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
            // kube-proxy wants bridged pod traffic through iptables (per namespace here).
            let _ = in_ns(
                &n.ns,
                &["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"],
            );
            // A default route, as every real node has: kube-proxy's DNAT of a Service's cluster
            // IP (the API at 10.96.0.1 for the agent) comes after a route lookup that must succeed.
            ip(
                &n.ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &cp_addr().to_string(),
                    "dev",
                    iface,
                ],
            )?;
            ip(
                &n.ns,
                &[
                    "-6",
                    "route",
                    "add",
                    "default",
                    "via",
                    &cp_addr6().to_string(),
                    "dev",
                    iface,
                ],
            )?;
            for j in 0..self.nodes.len() {
                if j != i {
                    for (cidr, via) in [
                        (format!("10.244.{j}.0/24"), node_addr(j).to_string()),
                        (pod_cidr6(j), node_addr6(j).to_string()),
                    ] {
                        ip(&n.ns, &["route", "add", &cidr, "via", &via, "dev", iface])?;
                    }
                }
            }
        }
        // XDP_TX out of a node's interface lands on its switch port, which needs an XDP program.
        fs::create_dir_all(&self.bpffs)?;
        cmd::sh(&["mount", "-t", "bpf", "bpf", &self.bpffs.to_string_lossy()])?;
        self.bpffs_mounted = true;
        let bin = sluice_binary()?;
        for port in self.ports() {
            in_ns(&sw, &["ethtool", "-K", &port, "gro", "on"])?;
            cmd::run_ok(
                Command::new("ip")
                    .args(["netns", "exec", &sw])
                    .arg(&bin)
                    .arg("--pin-dir")
                    .arg(self.bpffs.join("peer"))
                    .args(["xdp-pass", "--iface", &port]),
                DEFAULT_TIMEOUT,
            )
            .with_context(|| format!("sluice xdp-pass on switch port {port}"))?;
        }
        Ok(())
    }

    /// Every switch-side port (client, control plane, nodes).
    pub fn ports(&self) -> Vec<String> {
        let mut v = vec!["sw-c".to_owned(), "sw-cp".to_owned()];
        v.extend(self.nodes.iter().map(|n| n.port.clone()));
        v
    }

    fn save_sysctls(&mut self) -> Result<()> {
        let mut text = String::new();
        for k in HOST_SYSCTLS {
            let v = fs::read_to_string(format!("/proc/sys/{k}"))
                .with_context(|| format!("reading /proc/sys/{k}"))?;
            text.push_str(&format!("{k}={}\n", v.trim()));
            self.saved_sysctls.push((k.to_owned(), v.trim().to_owned()));
        }
        fs::write(self.dir.join("host-sysctls"), text)?;
        Ok(())
    }

    // ----- control plane -----

    fn start_control_plane(&mut self, kube: &Kube, kubeconfig: &Path) -> Result<()> {
        let bin = kube.bin_dir().to_owned();
        let kc = kubeconfig.to_string_lossy().into_owned();
        let cm = vec![
            bin.join("kube-controller-manager")
                .to_string_lossy()
                .into_owned(),
            format!("--kubeconfig={kc}"),
            format!(
                "--service-account-private-key-file={}",
                kube.sa_key().display()
            ),
            format!("--root-ca-file={}", kube.ca_cert(0).display()),
            "--leader-elect=false".into(),
            "--use-service-account-credentials=false".into(),
            // No IPAM (the pod CIDRs are fixed per node); no v1beta1 EndpointSlices (see the
            // module documentation).
            "--controllers=*,-nodeipam,-endpointslice,-endpointslicemirroring".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--node-monitor-grace-period=20s".into(),
            "--pod-eviction-timeout=30s".into(),
            "--feature-gates=IPv6DualStack=true".into(),
            "--logtostderr=true".into(),
            "-v=1".into(),
        ];
        self.spawn_control("kube-controller-manager", &cm)?;
        let sched = vec![
            bin.join("kube-scheduler").to_string_lossy().into_owned(),
            format!("--kubeconfig={kc}"),
            format!("--authentication-kubeconfig={kc}"),
            format!("--authorization-kubeconfig={kc}"),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--logtostderr=true".into(),
            "-v=1".into(),
        ];
        self.spawn_control("kube-scheduler", &sched)
    }

    fn spawn_control(&mut self, name: &str, argv: &[String]) -> Result<()> {
        let log = self.dir.join(format!("{name}.log"));
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.cp]).args(argv);
        let child = cmd::spawn_logged(c, &log)?;
        self.control.push((name.to_owned(), child));
        Ok(())
    }

    // ----- nodes -----

    /// `nsenter --mount=<node's mount ns> --net=/run/netns/<node> --`: the prefix of every
    /// command run on node `i`.
    fn node_cmd_prefix(&self, i: usize) -> Vec<String> {
        let n = &self.nodes[i];
        vec![
            "nsenter".into(),
            format!("--mount={}", n.mnt.display()),
            format!("--net=/run/netns/{}", n.ns),
            "--".into(),
        ]
    }

    /// A command run on node `i` (its network and mount namespaces).
    pub fn node_command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let p = self.node_cmd_prefix(i);
        let mut c = Command::new(&p[0]);
        c.args(&p[1..]).arg(program);
        c
    }

    /// Runs `argv` on node `i`; fails unless it exits 0.
    pub fn node_exec(&self, i: usize, argv: &[&str]) -> Result<Output> {
        let mut c = self.node_command(i, argv[0]);
        c.args(&argv[1..]);
        cmd::run_ok(&mut c, DEFAULT_TIMEOUT)
    }

    fn containerd_sock(&self, i: usize) -> PathBuf {
        self.nodes[i].dir.join("containerd.sock")
    }

    fn node_mount_ns(&mut self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        fs::create_dir_all(&n.dir)?;
        fs::write(&n.mnt, "")?;
        cmd::run_ok(
            Command::new("unshare")
                .arg(format!("--mount={}", n.mnt.display()))
                .args(["--propagation", "private", "true"]),
            DEFAULT_TIMEOUT,
        )
        .with_context(|| format!("creating the mount namespace of {}", n.name))?;
        self.nodes[i].mnt_bound = true;
        // Mount points that may be missing on the host.
        for d in [
            "/var/lib/cni",
            "/var/log/pods",
            "/var/log/containers",
            "/run/netns",
            "/run/containerd",
        ] {
            let p = PathBuf::from(d);
            if !p.exists() {
                fs::create_dir_all(&p)?;
                self.created_dirs.push(p);
                // Listed for a later run's stale cleanup too, should this one be killed.
                let list: Vec<String> = self
                    .created_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect();
                fs::write(self.dir.join("created-dirs"), list.join("\n"))?;
            }
        }
        let n = &self.nodes[i];
        for sub in ["pod-logs", "container-logs"] {
            fs::create_dir_all(n.dir.join(sub))?;
        }
        let script = format!(
            "set -e
mount -t bpf bpf /sys/fs/bpf
mount -t tmpfs tmpfs /run/containerd
mount -t tmpfs tmpfs /run/netns
mount -t tmpfs tmpfs /var/lib/cni
mount --bind {d}/pod-logs /var/log/pods
mount --bind {d}/container-logs /var/log/containers
",
            d = n.dir.display()
        );
        let mut c = Command::new("nsenter");
        c.arg(format!("--mount={}", n.mnt.display()))
            .args(["--", "sh", "-c", &script]);
        cmd::run_ok(&mut c, DEFAULT_TIMEOUT).with_context(|| format!("mounts of {}", n.name))?;
        // cgroup roots of the kubelet, in every v1 hierarchy, cpusets copied from the parent.
        for h in cgroup_hierarchies() {
            let d = h.join(&n.cgroup_root);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
            if h.ends_with("cpuset") {
                for f in ["cpuset.cpus", "cpuset.mems"] {
                    let v = fs::read_to_string(h.join(f))?;
                    fs::write(d.join(f), v.trim())?;
                }
            }
        }
        Ok(())
    }

    fn start_containerd(&mut self, i: usize) -> Result<()> {
        self.node_mount_ns(i)?;
        let n = &self.nodes[i];
        let pod_cidr = format!("10.244.{i}.0/24");
        let cni = n.dir.join("cni");
        fs::create_dir_all(&cni)?;
        fs::write(
            cni.join("10-sluice-test.conflist"),
            json!({
                "cniVersion": "0.4.0",
                "name": "sluice-test-pods",
                "plugins": [
                    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true,
                     "hairpinMode": true,
                     "ipam": {"type": "host-local",
                              "ranges": [[{"subnet": pod_cidr}], [{"subnet": pod_cidr6(i)}]],
                              "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
                    {"type": "portmap", "capabilities": {"portMappings": true}}
                ]
            })
            .to_string(),
        )?;
        let default = cmd::run_ok(
            Command::new("containerd").args(["config", "default"]),
            DEFAULT_TIMEOUT,
        )?;
        let d = n.dir.display().to_string();
        let mut config = String::from_utf8_lossy(&default.stdout).into_owned();
        for (from, to) in [
            (
                "root = \"/var/lib/containerd\"",
                format!("root = \"{d}/containerd/root\""),
            ),
            (
                "state = \"/run/containerd\"",
                format!("state = \"{d}/containerd/state\""),
            ),
            (
                "address = \"/run/containerd/containerd.sock\"",
                format!("address = \"{}\"", self.containerd_sock(i).display()),
            ),
            (
                "sandbox_image = \"registry.k8s.io/pause:3.6\"",
                format!("sandbox_image = \"{PAUSE_IMAGE}\""),
            ),
            // No CAP_SYS_RESOURCE here: without it every sandbox fails ("can't get final
            // child's PID from pipe").
            (
                "restrict_oom_score_adj = false",
                "restrict_oom_score_adj = true".into(),
            ),
            (
                "bin_dir = \"/opt/cni/bin\"",
                "bin_dir = \"/usr/lib/cni\"".into(),
            ),
            (
                "conf_dir = \"/etc/cni/net.d\"",
                format!("conf_dir = \"{}\"", cni.display()),
            ),
            (
                "path = \"/opt/containerd\"",
                format!("path = \"{d}/containerd/opt\""),
            ),
        ] {
            ensure!(
                config.contains(from),
                "`containerd config default` has no `{from}` (containerd version?)"
            );
            config = config.replace(from, &to);
        }
        let path = n.dir.join("containerd.toml");
        fs::write(&path, config)?;
        let log = n.dir.join("containerd.log");
        let mut c = self.node_command(i, "containerd");
        c.arg("--config").arg(&path);
        let child = cmd::spawn_logged(c, &log)?;
        let name = n.name.clone();
        self.nodes[i].containerd = Some(child);
        let sock = self.containerd_sock(i);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !sock.exists() {
            if let Some(Some(s)) = self.nodes[i]
                .containerd
                .as_mut()
                .map(|c| c.try_wait().ok().flatten())
            {
                return Err(ComponentExited(format!(
                    "containerd of {name} exited ({s}): {}",
                    exit_reason(&log)
                ))
                .into());
            }
            ensure!(
                Instant::now() < deadline,
                "containerd of {name} has no socket after 30 s: {}",
                tail(&log, 20)
            );
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn start_kubelet(&mut self, i: usize, kubeconfig: &Path) -> Result<()> {
        let n = &self.nodes[i];
        let config = n.dir.join("kubelet.yaml");
        fs::write(
            &config,
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
# One root per node: otherwise a kubelet removes the other nodes' pod cgroups.
cgroupRoot: /{root}
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
address: {addr}
podCIDR: 10.244.{i}.0/24
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
clusterDomain: cluster.local
# A test machine's disk is what it is: no evictions, no image garbage collection.
evictionHard: {{memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
# Dual-stack (alpha in 1.20): pods get an address of each family, the node an InternalIP of each.
featureGates: {{IPv6DualStack: true}}
",
                root = n.cgroup_root,
                addr = n.addr,
            ),
        )?;
        let mut c = self.node_command(i, crate::kube::binaries()?.join("kubelet"));
        c.arg(format!("--config={}", config.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .arg("--container-runtime=remote")
            .arg(format!(
                "--container-runtime-endpoint=unix://{}",
                self.containerd_sock(i).display()
            ))
            .arg(format!("--hostname-override={}", n.name))
            .arg(format!("--node-ip={},{}", n.addr, n.addr6))
            .arg(format!("--root-dir={}/kubelet", n.dir.display()))
            .arg(format!("--cert-dir={}/kubelet-pki", n.dir.display()))
            .args(["--logtostderr=true", "-v=1"]);
        let child = cmd::spawn_logged(c, &n.dir.join("kubelet.log"))?;
        self.nodes[i].kubelet = Some(child);
        Ok(())
    }

    fn start_proxy(&mut self, i: usize, kubeconfig: &Path) -> Result<()> {
        let n = &self.nodes[i];
        let config = n.dir.join("kube-proxy.yaml");
        fs::write(
            &config,
            format!(
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
# JSON: the EndpointSlices are a CRD (see the module documentation), which has no protobuf.
clientConnection: {{kubeconfig: {kc}, contentType: application/json}}
mode: iptables
clusterCIDR: {CLUSTER_CIDR},{CLUSTER_CIDR6}
bindAddress: {addr}
hostnameOverride: {name}
# kube-proxy's default: both families (the agents probe a node's IPv6 address for IPv6 VIPs).
healthzBindAddress: 0.0.0.0:10256
metricsBindAddress: 127.0.0.1:10249
oomScoreAdj: 0
# Leave the conntrack sysctls alone.
conntrack: {{maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}}
# Both families (an iptables and an ip6tables proxier), fed by the v1beta1 EndpointSlices the
# harness writes (EndpointSliceProxying is on by default in 1.20).
featureGates: {{IPv6DualStack: true}}
",
                kc = kubeconfig.display(),
                addr = n.addr,
                name = n.name,
            ),
        )?;
        let mut c = self.node_command(i, crate::kube::binaries()?.join("kube-proxy"));
        c.arg(format!("--config={}", config.display()))
            .args(["--logtostderr=true", "-v=1"]);
        let child = cmd::spawn_logged(c, &n.dir.join("kube-proxy.log"))?;
        self.nodes[i].proxy = Some(child);
        Ok(())
    }

    fn wait_nodes_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + NODES_READY_TIMEOUT;
        loop {
            for n in &mut self.nodes {
                for (what, c) in [
                    ("containerd", &mut n.containerd),
                    ("kubelet", &mut n.kubelet),
                    ("kube-proxy", &mut n.proxy),
                ] {
                    if let Some(Some(s)) = c.as_mut().map(|c| c.try_wait().ok().flatten()) {
                        return Err(ComponentExited(format!(
                            "{what} of {} exited ({s}): {}",
                            n.name,
                            exit_reason(&n.dir.join(format!("{what}.log")))
                        ))
                        .into());
                    }
                }
            }
            let ready = self.ready_nodes().unwrap_or_default();
            if ready.len() == self.nodes.len() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {ready:?} Ready after {NODES_READY_TIMEOUT:?}; kubelet of node-0: {}",
                    tail(&self.nodes[0].dir.join("kubelet.log"), 25)
                );
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// The names of the nodes whose Ready condition is True.
    pub fn ready_nodes(&self) -> Result<Vec<String>> {
        let v = self.kube().api("GET", "/api/v1/nodes", None)?;
        Ok(items(&v)
            .iter()
            .filter(|n| {
                n.pointer("/status/conditions")
                    .and_then(Value::as_array)
                    .is_some_and(|cs| {
                        cs.iter()
                            .any(|c| c["type"] == "Ready" && c["status"] == "True")
                    })
            })
            .filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str))
            .map(str::to_owned)
            .collect())
    }

    // ----- EndpointSlice mirror -----

    fn start_mirror(&mut self) {
        let kube = self.kube().clone();
        let stop = self.mirror_stop.clone();
        let log = self.dir.join("slice-mirror.log");
        self.mirror = thread::Builder::new()
            .name("slice-mirror".into())
            .spawn(move || {
                let mut applied: HashMap<(String, String), Value> = HashMap::new();
                let mut last_err = String::new();
                while !stop.load(Ordering::SeqCst) {
                    if let Err(e) = mirror_once(&kube, &mut applied) {
                        let e = format!("{e:#}");
                        if e != last_err {
                            let _ = fs::write(&log, &e);
                            last_err = e;
                        }
                    }
                    for _ in 0..5 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .ok();
    }

    // ----- accessors -----

    pub fn kube(&self) -> &Arc<Kube> {
        self.kube.as_ref().expect("the cluster's API server")
    }
    pub fn id(&self) -> &str {
        &self.id
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// How long [`Cluster::start`] took.
    pub fn age(&self) -> Duration {
        self.started.elapsed()
    }
    pub fn nodes(&self) -> usize {
        self.nodes.len()
    }
    /// "node-i", the Node object's name.
    pub fn node_name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }
    /// The index of node `name`.
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }
    pub fn node_addr(&self, i: usize) -> Ipv4Addr {
        self.nodes[i].addr
    }
    /// Node `i`'s IPv6 address (its second InternalIP).
    pub fn node_addr6(&self, i: usize) -> Ipv6Addr {
        self.nodes[i].addr6
    }
    pub fn node_ns(&self, i: usize) -> &str {
        &self.nodes[i].ns
    }
    /// Node `i`'s interface on the bridge (where its agent attaches).
    pub fn node_iface(&self, i: usize) -> &str {
        &self.nodes[i].iface
    }
    /// The switch-side port of node `i`'s interface.
    pub fn node_port(&self, i: usize) -> &str {
        &self.nodes[i].port
    }
    pub fn client_ns(&self) -> &str {
        &self.client
    }
    pub fn switch_ns(&self) -> &str {
        &self.sw
    }
    /// The log of `what` (containerd, kubelet, kube-proxy) on node `i`.
    pub fn node_log(&self, i: usize, what: &str) -> String {
        fs::read_to_string(self.nodes[i].dir.join(format!("{what}.log"))).unwrap_or_default()
    }

    /// kubectl as admin; fails with its stderr unless it exits 0.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output> {
        self.kube().kubectl_ok(args)
    }

    /// `kubectl ... -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        let out = self.kubectl(&a)?;
        serde_json::from_slice(&out.stdout).with_context(|| format!("kubectl {}", args.join(" ")))
    }

    // ----- the client and the segment -----

    /// The client routes `vip` to node `i` (as a BGP router that learnt it from that node), by
    /// the node's address of the VIP's family.
    pub fn route_vip_via(&self, vip: impl Into<IpAddr>, i: usize) -> Result<()> {
        let vip = vip.into();
        let (host, via) = match vip {
            IpAddr::V4(v) => (format!("{v}/32"), self.node_addr(i).to_string()),
            IpAddr::V6(v) => (format!("{v}/128"), self.node_addr6(i).to_string()),
        };
        ip(
            &self.client,
            &["route", "replace", &host, "via", &via, "dev", IFACE],
        )?;
        Ok(())
    }

    /// The client resolves `vip` on the link (ARP; IPv6: neighbour solicitation), as for a VIP
    /// announced on the segment.
    pub fn vip_on_link(&self, vip: impl Into<IpAddr>) -> Result<()> {
        let vip = vip.into();
        let host = match vip {
            IpAddr::V4(v) => format!("{v}/32"),
            IpAddr::V6(v) => format!("{v}/128"),
        };
        ip(&self.client, &["route", "replace", &host, "dev", IFACE])?;
        let _ = ip(
            &self.client,
            &["neigh", "flush", "to", &vip.to_string(), "dev", IFACE],
        );
        Ok(())
    }

    /// The client's neighbour entry for `addr`: its MAC, if any.
    pub fn client_neighbour(&self, addr: impl Into<IpAddr>) -> Result<Option<String>> {
        let addr = addr.into();
        let out = ip(&self.client, &["-j", "neigh", "show", &addr.to_string()])?;
        Ok(crate::lab::parse_neighbours(&out.stdout)?
            .remove(&addr)
            .map(|(mac, _state)| mac))
    }

    /// The MAC of node `i`'s interface.
    pub fn node_mac(&self, i: usize) -> String {
        format!("02:5c:50:00:00:{:02x}", 10 + i)
    }

    /// Takes node `i`'s link down (`up` false: its switch port) or up again.
    pub fn set_node_link(&self, i: usize, up: bool) -> Result<()> {
        ip(
            &self.sw,
            &[
                "link",
                "set",
                self.node_port(i),
                if up { "up" } else { "down" },
            ],
        )?;
        Ok(())
    }

    /// `n` HTTP GETs of `http://<host>:<port><path>` from the client, each on a new TCP
    /// connection, 8 at once, each bounded (3 s connect, 10 s total). Returns every answer's body
    /// (trimmed lines) and how many got none.
    pub fn curl(
        &self,
        host: impl Into<IpAddr>,
        port: u16,
        path: &str,
        n: usize,
    ) -> Result<(Vec<String>, usize)> {
        ensure!(n >= 1, "curl: n must be at least 1");
        let sep = if path.contains('?') { '&' } else { '?' };
        // SocketAddr's form brackets an IPv6 host (curl's globbing leaves such a host alone).
        let url = format!(
            "http://{}{path}{sep}req=[1-{n}]",
            std::net::SocketAddr::new(host.into(), port)
        );
        let out = cmd::run(
            Command::new("ip")
                .args(["netns", "exec", &self.client])
                .args([
                    "curl",
                    "--silent",
                    "--parallel",
                    "--parallel-max",
                    "8",
                    "--connect-timeout",
                    "3",
                    "--max-time",
                    "10",
                    "--header",
                    "Connection: close",
                    &url,
                ]),
            Duration::from_secs(60) + Duration::from_millis(20 * n as u64),
        )?;
        let bodies: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.trim().to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        let failed = n.saturating_sub(bodies.len());
        Ok((bodies, failed))
    }

    /// A long-lived connection from the client to `target` (a line echo: the web image's
    /// port 7000), one line every 100 ms, at most 5 minutes; stopped with the cluster at the latest.
    pub fn long_conn(&mut self, target: SocketAddrV4) -> Result<LongConn> {
        let stop = Arc::new(AtomicBool::new(false));
        self.stop_flags.push(stop.clone());
        LongConn::open(
            &self.client,
            target,
            Duration::from_millis(100),
            Duration::from_secs(300),
            stop,
        )
    }

    /// Installs frame counters on the bridge (switch namespace): per ingress port, frames to
    /// `vip` and TCP SYNs to it; per egress port, SYNs to it (which node a balancer sent the
    /// connection to). Read with [`Cluster::vip_frames`] and [`Cluster::vip_syns_out`].
    pub fn count_vip_frames(&self, vip: impl Into<IpAddr>) -> Result<()> {
        let vip = vip.into();
        let l3 = if vip.is_ipv6() { "ip6" } else { "ip" };
        let mut rules = String::new();
        for p in self.ports() {
            let k = p.replace('-', "_");
            rules.push_str(&format!(
                "  counter f_{k} {{ }}\n  counter s_{k} {{ }}\n  counter o_{k} {{ }}\n"
            ));
        }
        rules.push_str(
            "  chain frames {\n    type filter hook forward priority 0; policy accept;\n",
        );
        for p in self.ports() {
            let k = p.replace('-', "_");
            rules.push_str(&format!(
                "    iifname \"{p}\" {l3} daddr {vip} counter name f_{k}\n    iifname \"{p}\" {l3} daddr {vip} tcp flags & (syn | ack) == syn counter name s_{k}\n    oifname \"{p}\" {l3} daddr {vip} tcp flags & (syn | ack) == syn counter name o_{k}\n"
            ));
        }
        rules.push_str("  }\n");
        let text = format!(
            "table bridge sluicecluster\ndelete table bridge sluicecluster\ntable bridge sluicecluster {{\n{rules}}}\n"
        );
        let path = self.dir.join("frames.nft");
        fs::write(&path, text)?;
        in_ns(&self.sw, &["nft", "-f", &path.to_string_lossy()])?;
        Ok(())
    }

    /// Per switch port: (frames to the VIP, SYNs to the VIP) entering the bridge there, since
    /// [`Cluster::count_vip_frames`].
    pub fn vip_frames(&self) -> Result<BTreeMap<String, (u64, u64)>> {
        let c = self.frame_counters()?;
        self.ports()
            .into_iter()
            .map(|p| {
                let k = p.replace('-', "_");
                let f = counter(&c, &format!("f_{k}"))?;
                let s = counter(&c, &format!("s_{k}"))?;
                Ok((p, (f, s)))
            })
            .collect()
    }

    /// Per switch port: SYNs to the VIP leaving the bridge there.
    pub fn vip_syns_out(&self) -> Result<BTreeMap<String, u64>> {
        let c = self.frame_counters()?;
        self.ports()
            .into_iter()
            .map(|p| {
                let k = p.replace('-', "_");
                Ok((p, counter(&c, &format!("o_{k}"))?))
            })
            .collect()
    }

    fn frame_counters(&self) -> Result<HashMap<String, u64>> {
        let out = in_ns(
            &self.sw,
            &[
                "nft",
                "-j",
                "list",
                "counters",
                "table",
                "bridge",
                "sluicecluster",
            ],
        )?;
        let v: Value = serde_json::from_slice(&out.stdout).context("nft -j: not JSON")?;
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for e in v["nftables"].as_array().into_iter().flatten() {
            if let Some(c) = e.get("counter")
                && let (Some(name), Some(p)) = (c["name"].as_str(), c["packets"].as_u64())
            {
                by_name.insert(name.to_owned(), p);
            }
        }
        Ok(by_name)
    }

    /// Node `i`'s agent's `/metrics` (the DaemonSet serves them on the node's loopback,
    /// 127.0.0.1:9477): series (name with labels) -> value.
    pub fn agent_metrics(&self, i: usize) -> Result<BTreeMap<String, f64>> {
        let out = self.node_exec(
            i,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "--fail",
                "http://127.0.0.1:9477/metrics",
            ],
        )?;
        crate::lab::parse_metrics(&out.stdout)
            .with_context(|| format!("the agent's /metrics on {}", self.node_name(i)))
    }

    /// Node `i`'s agent's `/readyz` body (the DaemonSet's health address, 127.0.0.1:9941): the
    /// attached interface and why, then what is degraded.
    pub fn agent_readyz(&self, i: usize) -> Result<String> {
        let out = self.node_exec(
            i,
            &[
                "curl",
                "-sS",
                "--max-time",
                "10",
                "http://127.0.0.1:9941/readyz",
            ],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    // ----- waiting -----

    /// Waits until `check` returns Ok(true), at most `timeout`; the error of the last check, if
    /// any, goes into the failure.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<bool>,
    ) -> Result<Duration> {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            match check() {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last = format!("{e:#}"),
            }
            if start.elapsed() >= timeout {
                bail!("{what}: not after {timeout:?} {last}");
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Sets Service `svc`'s (namespace default) load-balancer ingress IP, as MetalLB's IPAM
    /// would.
    pub fn set_ingress(&self, svc: &str, vip: Ipv4Addr) -> Result<()> {
        self.kube().patch_status(
            &format!("/api/v1/namespaces/default/services/{svc}"),
            &json!({"status": {"loadBalancer": {"ingress": [{"ip": vip.to_string()}]}}}),
        )
    }

    /// Sets Service `svc`'s (namespace default) load-balancer ingress IPs (several families).
    pub fn set_ingress_ips(&self, svc: &str, vips: &[IpAddr]) -> Result<()> {
        let ingress: Vec<Value> = vips.iter().map(|v| json!({"ip": v.to_string()})).collect();
        self.kube().patch_status(
            &format!("/api/v1/namespaces/default/services/{svc}"),
            &json!({"status": {"loadBalancer": {"ingress": ingress}}}),
        )
    }

    /// Pods of namespace `ns` matching label selector `selector`, as JSON.
    pub fn pods(&self, ns: &str, selector: &str) -> Result<Vec<Value>> {
        let v = self.kube().api(
            "GET",
            &format!("/api/v1/namespaces/{ns}/pods?labelSelector={selector}"),
            None,
        )?;
        Ok(items(&v).to_vec())
    }

    fn teardown(&mut self) {
        for f in &self.stop_flags {
            f.store(true, Ordering::SeqCst);
        }
        self.mirror_stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.mirror.take() {
            let _ = h.join();
        }
        let me = std::process::id();
        // Kubelets first (they would restart what is killed), then the proxies, the pods and
        // the runtimes.
        for n in &mut self.nodes {
            if let Some(mut c) = n.kubelet.take() {
                cmd::terminate(&mut c, Duration::from_secs(5));
            }
            if let Some(mut c) = n.proxy.take() {
                cmd::terminate(&mut c, Duration::from_secs(5));
            }
        }
        for n in &self.nodes {
            kill_cgroup_tree(&n.cgroup_root);
        }
        for n in &mut self.nodes {
            if let Some(mut c) = n.containerd.take() {
                cmd::terminate(&mut c, Duration::from_secs(5));
            }
        }
        kill_cmdline_containing(&self.dir.to_string_lossy(), me);
        for (_, c) in &mut self.control {
            cmd::terminate(c, Duration::from_secs(5));
        }
        self.control.clear();
        // The API server and etcd (if nothing else holds the Arc: the mirror has stopped).
        self.kube = None;
        for n in &mut self.nodes {
            if n.mnt_bound {
                unmount(&n.mnt);
                n.mnt_bound = false;
            }
        }
        for ns in self.namespaces.iter().rev() {
            kill_ns_processes(ns, me);
            if let Err(e) = cmd::sh(&["ip", "netns", "del", ns]) {
                eprintln!("cluster {}: cannot delete namespace {ns}: {e:#}", self.id);
            }
        }
        self.namespaces.clear();
        for n in &self.nodes {
            remove_cgroup_tree(&n.cgroup_root);
        }
        if self.bpffs_mounted {
            unmount(&self.bpffs);
            self.bpffs_mounted = false;
        }
        for (k, v) in &self.saved_sysctls {
            let _ = fs::write(format!("/proc/sys/{k}"), v);
        }
        for d in self.created_dirs.iter().rev() {
            let _ = fs::remove_dir(d);
        }
        if std::env::var_os("SLUICE_KEEP_CLUSTER").is_none()
            && let Err(e) = fs::remove_dir_all(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!(
                "cluster {}: cannot remove {}: {e}",
                self.id,
                self.dir.display()
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Counter `name` of the bridge's table: one that is not there is an error, never 0 (a rule
/// that failed to install would otherwise pass every "nothing counted" check).
fn counter(counters: &HashMap<String, u64>, name: &str) -> Result<u64> {
    counters.get(name).copied().with_context(|| {
        format!("the bridge has no counter {name} (installed by count_vip_frames)")
    })
}

fn which(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// `items` of a list answer.
/// The tag the test web image is built with ([`image::build_web_image`]).
pub const WEB_TAG: &str = "1";

/// A Deployment `web` of `replicas` test web pods spread over the nodes: busybox httpd on port
/// 80 (its CGI names pod, node and client) and a line echo on port 7000.
pub fn web_deployment(replicas: usize) -> String {
    let image = format!("{}:{WEB_TAG}", image::WEB_IMAGE);
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: default}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
        - maxSkew: 1
          topologyKey: kubernetes.io/hostname
          whenUnsatisfiable: DoNotSchedule
          labelSelector: {{matchLabels: {{app: web}}}}
      containers:
        - name: http
          image: {image}
          imagePullPolicy: Never
          env:
            - name: NODE_NAME
              valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
          readinessProbe: {{tcpSocket: {{port: 80}}, periodSeconds: 1}}
        - name: echo
          image: {image}
          imagePullPolicy: Never
          command: [/bin/nc, -ll, -p, \"7000\", -e, /bin/line-echo]
"
    )
}

/// A `type: LoadBalancer` Service `name` (namespace default) of the web pods, ports 80 and
/// 7000, with `externalTrafficPolicy: policy` and `annotations` (`key: value` pairs or "").
pub fn lb_service(name: &str, policy: &str, annotations: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default, annotations: {{{annotations}}}}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: {policy}
  selector: {{app: web}}
  ports:
    - {{name: http, port: 80, targetPort: 80}}
    - {{name: echo, port: 7000, targetPort: 7000}}
"
    )
}

/// A dual-stack (`RequireDualStack`, IPv4 first) `type: LoadBalancer` Service `name` (namespace
/// default, policy Cluster) of the web pods, ports 80 and 7000.
pub fn dual_stack_lb_service(name: &str) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  type: LoadBalancer
  externalTrafficPolicy: Cluster
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  selector: {{app: web}}
  ports:
    - {{name: http, port: 80, targetPort: 80}}
    - {{name: echo, port: 7000, targetPort: 7000}}
"
    )
}

/// A pod that is Ready and not being deleted.
pub fn pod_ready(p: &Value) -> bool {
    p.pointer("/metadata/deletionTimestamp").is_none() && pod_is_ready(p)
}

pub fn items(v: &Value) -> &[Value] {
    v.get("items")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// The cgroup v1 hierarchies (directories under /sys/fs/cgroup that are cgroup mounts).
fn cgroup_hierarchies() -> Vec<PathBuf> {
    cgroup_mounts(" - cgroup ")
}

/// Every cgroup hierarchy, v1 and the v2 one of a hybrid setup (runc creates the containers'
/// cgroups there too): where cgroups are killed and removed.
fn all_cgroup_hierarchies() -> Vec<PathBuf> {
    let mut v = cgroup_mounts(" - cgroup ");
    v.extend(cgroup_mounts(" - cgroup2 "));
    v
}

fn cgroup_mounts(kind: &str) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter(|l| l.contains(kind))
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| mp.starts_with(CGROUP_V1))
        .map(PathBuf::from)
        .collect()
}

/// SIGKILLs every process in cgroup `/<root>` (any depth, any hierarchy), a few rounds.
fn kill_cgroup_tree(root: &str) {
    for _round in 0..5 {
        let mut any = false;
        for h in all_cgroup_hierarchies() {
            let top = h.join(root);
            for dir in walk_dirs(&top) {
                let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for p in procs
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                {
                    if p != std::process::id() {
                        cmd::signal(p, libc::SIGKILL);
                        any = true;
                    }
                }
            }
        }
        if !any {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Removes cgroup `/<root>` and everything below it, in every hierarchy (deepest first).
fn remove_cgroup_tree(root: &str) {
    for h in all_cgroup_hierarchies() {
        let mut dirs = walk_dirs(&h.join(root));
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in dirs {
            if let Err(e) = fs::remove_dir(&d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("cluster: cannot remove cgroup {}: {e}", d.display());
            }
        }
    }
}

fn walk_dirs(top: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![top.to_path_buf()];
    while let Some(d) = stack.pop() {
        if !d.is_dir() {
            continue;
        }
        if let Ok(rd) = fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(e.path());
                }
            }
        }
        out.push(d);
    }
    out
}

/// SIGKILLs every process whose command line contains `needle` (never `me`).
fn kill_cmdline_containing(needle: &str, me: u32) {
    for _round in 0..3 {
        let mut any = false;
        for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if p == me {
                continue;
            }
            let cmdline = fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(needle) && cmd::pid_alive(p) {
                cmd::signal(p, libc::SIGKILL);
                any = true;
            }
        }
        if !any {
            return;
        }
        thread::sleep(Duration::from_millis(200));
    }
}

/// Parses "slk<pid>-..." (a cluster namespace or cgroup name) into the pid.
fn cluster_name_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("slk")?;
    let (pid, role) = rest.split_once('-')?;
    matches!(role, "sw" | "cp" | "c")
        .then_some(())
        .or_else(|| {
            role.strip_prefix('n')
                .filter(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                .map(drop)
        })?;
    pid.parse().ok()
}

/// Parses "sluice-cluster-<pid>-<n>" (a cluster's temp dir) into the pid.
fn cluster_dir_pid(name: &str) -> Option<u32> {
    temp_dir_pid(name, "sluice-cluster-")
}

/// Removes what clusters of dead processes left: processes (daemons, shims, containers), mount
/// namespaces and bpffs mounts, network namespaces, cgroups, temp dirs, and restores the host
/// sysctls they saved.
fn cleanup_stale() {
    let me = std::process::id();
    let dead = |pid: u32| pid != me && !cmd::pid_alive(pid);
    let tmp = std::env::temp_dir();
    let dirs: Vec<PathBuf> = fs::read_dir(&tmp)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| cluster_dir_pid(&e.file_name().to_string_lossy()).is_some_and(dead))
        .map(|e| e.path())
        .collect();
    // Kubelets first, by their command line (it names the dir), then containers by cgroup.
    for d in &dirs {
        eprintln!(
            "sluice cluster: removing {} left by a dead test process",
            d.display()
        );
        kill_cmdline_containing(&format!("{}/", d.display()), me);
    }
    for h in all_cgroup_hierarchies() {
        for e in fs::read_dir(&h).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if cluster_name_pid(&name).is_some_and(dead) {
                kill_cgroup_tree(&name);
                remove_cgroup_tree(&name);
            }
        }
    }
    unmount_dead_temp_dirs(cluster_dir_pid, dead);
    remove_dead_namespaces(cluster_name_pid, dead, me);
    for d in &dirs {
        if let Ok(text) = fs::read_to_string(d.join("host-sysctls")) {
            for line in text.lines() {
                if let Some((k, v)) = line.split_once('=')
                    && HOST_SYSCTLS.contains(&k)
                {
                    let _ = fs::write(format!("/proc/sys/{k}"), v);
                }
            }
        }
        // Mount points it created on the host (empty once its mount namespaces are gone).
        if let Ok(text) = fs::read_to_string(d.join("created-dirs")) {
            for dir in text.lines().rev() {
                if [
                    "/var/lib/cni",
                    "/var/log/pods",
                    "/var/log/containers",
                    "/run/netns",
                    "/run/containerd",
                ]
                .contains(&dir)
                {
                    let _ = fs::remove_dir(dir);
                }
            }
        }
        let _ = fs::remove_dir_all(d);
    }
}

// ----- the EndpointSlice mirror -----

fn labels_match(selector: &serde_json::Map<String, Value>, labels: &Value) -> bool {
    selector
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// The pod's addresses (`status.podIPs`, else `status.podIP`).
fn pod_ips(pod: &Value) -> Vec<&str> {
    let mut v: Vec<&str> = pod
        .pointer("/status/podIPs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p["ip"].as_str())
        .collect();
    if v.is_empty()
        && let Some(ip) = pod.pointer("/status/podIP").and_then(Value::as_str)
    {
        v.push(ip);
    }
    v
}

/// "IPv4" or "IPv6", an EndpointSlice's addressType.
fn family(ip: &str) -> &'static str {
    if ip.contains(':') { "IPv6" } else { "IPv4" }
}

fn pod_ip_of<'a>(pod: &'a Value, fam: &str) -> Option<&'a str> {
    pod_ips(pod).into_iter().find(|ip| family(ip) == fam)
}

/// A pod whose Ready condition is True (being deleted or not).
fn pod_is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// One pass: EndpointSlices (`<service>-sluice-test`, IPv6: `<service>-sluice-test-ipv6`), one
/// per family of every Service, from its Endpoints (ready and not-ready addresses; 1.20's
/// Endpoints hold the primary family only: the other family's address is its pod's) and, for a
/// Service with a selector, its terminating pods (serving while still Ready, as the EndpointSlice
/// controller of Kubernetes >= 1.22 reports them). The agents read them as v1, kube-proxy as
/// v1beta1 (the same objects; `topology` is the v1beta1 form of `nodeName`).
fn mirror_once(kube: &Kube, applied: &mut HashMap<(String, String), Value>) -> Result<()> {
    let services = kube.api("GET", "/api/v1/services", None)?;
    let pods = kube.api("GET", "/api/v1/pods", None)?;
    let endpoints = kube.api("GET", "/api/v1/endpoints", None)?;
    let mut pods_by_name: HashMap<(&str, &str), &Value> = HashMap::new();
    for p in items(&pods) {
        if let (Some(ns), Some(name)) = (
            p.pointer("/metadata/namespace").and_then(Value::as_str),
            p.pointer("/metadata/name").and_then(Value::as_str),
        ) {
            pods_by_name.insert((ns, name), p);
        }
    }
    let mut eps: HashMap<(String, String), &Value> = HashMap::new();
    for e in items(&endpoints) {
        let ns = e["metadata"]["namespace"].as_str().unwrap_or("").to_owned();
        let name = e["metadata"]["name"].as_str().unwrap_or("").to_owned();
        eps.insert((ns, name), e);
    }
    let mut want: HashMap<(String, String), Value> = HashMap::new();
    // One slice per family of each Service.
    for (svc, fam) in items(&services).iter().flat_map(|svc| {
        let families: Vec<&str> = svc
            .pointer("/spec/ipFamilies")
            .and_then(Value::as_array)
            .map(|f| f.iter().filter_map(Value::as_str).collect())
            .filter(|f: &Vec<&str>| !f.is_empty())
            .unwrap_or_else(|| vec!["IPv4"]);
        families.into_iter().map(move |f| (svc, f))
    }) {
        // None: Endpoints written by someone else (the `kubernetes` Service), mirrored as the
        // EndpointSliceMirroring controller does.
        let selector = svc.pointer("/spec/selector").and_then(Value::as_object);
        let ns = svc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        let name = svc["metadata"]["name"].as_str().unwrap_or("").to_owned();
        // The address of `fam` for an Endpoints address: its own, or its pod's other one.
        let addr_for = |a: &Value| -> Option<String> {
            let ip = a["ip"].as_str()?;
            if family(ip) == fam {
                return Some(ip.to_owned());
            }
            let r = &a["targetRef"];
            if r["kind"] != "Pod" {
                return None;
            }
            let pod = pods_by_name.get(&(r["namespace"].as_str()?, r["name"].as_str()?))?;
            pod_ip_of(pod, fam).map(str::to_owned)
        };
        let mut endpoints_out = Vec::new();
        let mut ports: Vec<Value> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if let Some(e) = eps.get(&(ns.clone(), name.clone())) {
            for subset in e["subsets"].as_array().into_iter().flatten() {
                for p in subset["ports"].as_array().into_iter().flatten() {
                    let port = json!({"name": p["name"].as_str().unwrap_or(""),
                                  "port": p["port"], "protocol": p["protocol"]});
                    if !ports.contains(&port) {
                        ports.push(port);
                    }
                }
                for (key, ready) in [("addresses", true), ("notReadyAddresses", false)] {
                    for a in subset[key].as_array().into_iter().flatten() {
                        let Some(ip) = addr_for(a) else {
                            continue;
                        };
                        if !seen.insert(ip.clone()) {
                            continue;
                        }
                        let mut ep = json!({
                            "addresses": [ip],
                            "conditions": {"ready": ready, "serving": ready, "terminating": false},
                        });
                        if let Some(n) = a["nodeName"].as_str() {
                            ep["nodeName"] = json!(n);
                            ep["topology"] = json!({"kubernetes.io/hostname": n});
                        }
                        if a.get("targetRef").is_some() {
                            ep["targetRef"] = a["targetRef"].clone();
                        }
                        endpoints_out.push(ep);
                    }
                }
            }
        }
        for pod in items(&pods) {
            if pod["metadata"]["namespace"] != ns.as_str()
                || pod.pointer("/metadata/deletionTimestamp").is_none()
                || !selector.is_some_and(|s| labels_match(s, &pod["metadata"]["labels"]))
            {
                continue;
            }
            let Some(ip) = pod_ip_of(pod, fam) else {
                continue;
            };
            if !seen.insert(ip.to_owned()) {
                continue;
            }
            let serving = pod_is_ready(pod);
            let mut ep = json!({
                "addresses": [ip],
                "conditions": {"ready": false, "serving": serving, "terminating": true},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": pod["metadata"]["name"]},
            });
            if let Some(n) = pod.pointer("/spec/nodeName").and_then(Value::as_str) {
                ep["nodeName"] = json!(n);
                ep["topology"] = json!({"kubernetes.io/hostname": n});
            }
            endpoints_out.push(ep);
        }
        if ports.is_empty() {
            for p in svc
                .pointer("/spec/ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let target = p["targetPort"].as_u64().or_else(|| p["port"].as_u64());
                ports.push(json!({"name": p["name"].as_str().unwrap_or(""),
                              "port": target, "protocol": p["protocol"]}));
            }
        }
        endpoints_out.sort_by_key(|e| e["addresses"][0].as_str().unwrap_or("").to_owned());
        let slice_name = match fam {
            "IPv6" => format!("{name}-sluice-test-ipv6"),
            _ => format!("{name}-sluice-test"),
        };
        want.insert(
            (ns.clone(), slice_name.clone()),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {"name": slice_name, "namespace": ns, "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": "sluice-tests"}},
                "addressType": fam,
                "endpoints": endpoints_out,
                "ports": ports,
            }),
        );
    }
    for (key, slice) in &want {
        if applied.get(key) == Some(slice) {
            continue;
        }
        kube.api(
            "PATCH",
            &format!(
                "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices/{}?fieldManager=sluice-tests&force=true",
                key.0, key.1
            ),
            Some(("application/apply-patch+yaml", slice)),
        )?;
        applied.insert(key.clone(), slice.clone());
    }
    let gone: Vec<_> = applied
        .keys()
        .filter(|k| !want.contains_key(*k))
        .cloned()
        .collect();
    for key in gone {
        let _ = kube.api(
            "DELETE",
            &format!(
                "/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices/{}",
                key.0, key.1
            ),
            None,
        );
        applied.remove(&key);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cluster_names() {
        assert_eq!(cluster_name_pid("slk42-sw"), Some(42));
        assert_eq!(cluster_name_pid("slk42-n3"), Some(42));
        assert_eq!(cluster_name_pid("slk42-c"), Some(42));
        assert_eq!(cluster_name_pid("slk42-n"), None);
        assert_eq!(cluster_name_pid("slk42-x"), None);
        assert_eq!(cluster_name_pid("sl42-0-c"), None);
        assert_eq!(cluster_dir_pid("sluice-cluster-42-0"), Some(42));
        assert_eq!(cluster_dir_pid("sluice-cluster-42"), None);
    }

    #[test]
    fn an_exit_reason_is_the_first_fatal_line_not_the_dump_s_end() {
        let path = std::env::temp_dir().join(format!("exit-reason-{}.log", std::process::id()));
        let log = "I1207 19:40:01 starting\nF1207 19:40:02 failed to run Kubelet: no cgroup\n\
                   goroutine 1 [running]:\n\tmain.go:70 +0x8c\ngoroutine 332 [select]:\n";
        fs::write(&path, log).unwrap();
        let reason = exit_reason(&path);
        assert!(
            reason.starts_with("F1207 19:40:02 failed to run Kubelet: no cgroup"),
            "{reason}"
        );
        fs::write(&path, "goroutine 1 [running]:\n").unwrap();
        assert!(exit_reason(&path).starts_with("no fatal line"));
        let _ = fs::remove_file(&path);
    }
}
