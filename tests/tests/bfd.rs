//! The agent's BFD against a real router's (FRR bfdd) across network namespaces, with a forger
//! on the same link, over IPv4 and over IPv6. Needs root and FRR (scripts/bootstrap.sh).
//!
//! ```text
//!   r  (FRR bfdd, 192.0.2.1 on bridge br0) --+-- lb: the agent's BFD (192.0.2.10)
//!                                           +-- c:  the forger (192.0.2.66, raw socket)
//!   (IPv6: 2001:db8::1, 2001:db8::10, 2001:db8::66)
//! ```
//!
//! The session comes Up only if FRR takes our packets: single-hop BFD (RFC 5881) sends with TTL
//! / hop limit 255 and FRR drops anything less. The forger knows both discriminators (read from
//! FRR) and sends AdminDown from the router's own address, but with TTL 64 (as a host further
//! away would have to): dropped and counted, the session stays Up. From its own address with
//! TTL 255: dropped too. The router's real AdminDown takes BFD Down without a failure (BGP
//! would stay); cutting the link is a failure, detected within the detect time (3 x 100 ms).

use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_userspace::bgp::bfd::{
    BFD_PORT, Bfd, BfdConfig, BfdPeer, DropCounts, Drops, Link, Packet, Sockets, State,
};
use sluice_tests::{cmd, netns, require_root};
use tokio::sync::watch;

/// One address family's link: its addresses, and the `<n>` of its namespaces' names (the two
/// tests may run at once).
#[derive(Clone, Copy, Debug)]
struct Family {
    router: IpAddr,
    node: IpAddr,
    forger: IpAddr,
    prefix_len: u8,
    n: u8,
}

const V4: Family = Family {
    router: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
    node: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
    forger: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 66)),
    prefix_len: 24,
    n: 0,
};

const V6: Family = Family {
    router: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
    node: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10)),
    forger: IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x66)),
    prefix_len: 64,
    n: 1,
};

/// Both ends' timing: a dead peer is detected after 3 x 100 ms.
const BFD: BfdConfig = BfdConfig {
    interval: Duration::from_millis(100),
    multiplier: 3,
};

/// The namespaces ("sl<pid>-<n>-<role>", the lab naming, so that a killed run's are removed by
/// the next lab) and FRR's pathspace, removed on drop.
struct Topology {
    f: Family,
    r: String,
    lb: String,
    c: String,
    frr_started: bool,
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::run_ok(Command::new("ip").args(args), cmd::DEFAULT_TIMEOUT).map(|_| ())
}

impl Topology {
    fn build(f: Family) -> Result<Topology> {
        let id = format!("sl{}-{}", std::process::id(), f.n);
        let t = Topology {
            f,
            r: format!("{id}-r"),
            lb: format!("{id}-lb"),
            c: format!("{id}-c"),
            frr_started: false,
        };
        for ns in [&t.r, &t.lb, &t.c] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", &t.r, "link", "add", "br0", "type", "bridge"])?;
        t.add_addr(&t.r, f.router, "br0")?;
        ip(&["-n", &t.r, "link", "set", "br0", "up"])?;
        for (port, ns, addr) in [("p0", &t.lb, f.node), ("p1", &t.c, f.forger)] {
            ip(&[
                "-n", &t.r, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", &t.r, "link", "set", port, "master", "br0", "up"])?;
            t.add_addr(ns, addr, "eth0")?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(t)
    }

    /// IPv6 without duplicate address detection: usable at once.
    fn add_addr(&self, ns: &str, addr: IpAddr, dev: &str) -> Result<()> {
        let net = format!("{addr}/{}", self.f.prefix_len);
        let mut args = vec!["-n", ns, "addr", "add", &net, "dev", dev];
        if addr.is_ipv6() {
            args.push("nodad");
        }
        ip(&args)
    }

    fn start_frr(&mut self) -> Result<()> {
        let etc = Path::new("/etc/frr").join(&self.r);
        let run = Path::new("/var/run/frr").join(&self.r);
        fs::create_dir_all(&etc)?;
        fs::create_dir_all(&run)?;
        let daemons = fs::read_to_string("/etc/frr/daemons")
            .context("reading /etc/frr/daemons (is frr installed? scripts/bootstrap.sh)")?
            .replace("bfdd=no", "bfdd=yes");
        fs::write(etc.join("daemons"), daemons)?;
        fs::write(etc.join("vtysh.conf"), "service integrated-vtysh-config\n")?;
        fs::write(
            etc.join("frr.conf"),
            format!(
                "frr defaults traditional
hostname {ns}
log file {run}/frr.log
!
bfd
 peer {node} local-address {router}
  receive-interval {ms}
  transmit-interval {ms}
  detect-multiplier {mult}
 !
!
",
                ns = self.r,
                run = run.display(),
                node = self.f.node,
                router = self.f.router,
                ms = BFD.interval.as_millis(),
                mult = BFD.multiplier,
            ),
        )?;
        for d in [&etc, &run] {
            cmd::run_ok(
                Command::new("chown").args(["-R", "frr:frr", &d.to_string_lossy()]),
                cmd::DEFAULT_TIMEOUT,
            )?;
        }
        self.frr_started = true;
        cmd::run_ok(
            Command::new("ip").args([
                "netns",
                "exec",
                &self.r,
                "/usr/lib/frr/frrinit.sh",
                "start",
                &self.r,
            ]),
            Duration::from_secs(60),
        )
        .context("starting FRR in the router namespace")?;
        Ok(())
    }

    fn vtysh(&self, commands: &[&str]) -> Result<String> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.r, "vtysh", "-N", &self.r]);
        for command in commands {
            c.args(["-c", command]);
        }
        let out = cmd::run_ok(&mut c, cmd::DEFAULT_TIMEOUT)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// FRR's session with the node: (its discriminator, the node's), once it knows both.
    fn frr_discriminators(&self) -> Result<(u32, u32)> {
        let v: serde_json::Value = serde_json::from_str(&self.vtysh(&["show bfd peers json"])?)?;
        let peer = v
            .as_array()
            .and_then(|a| a.iter().find(|p| p["peer"] == self.f.node.to_string()))
            .context("FRR shows no BFD peer for the node")?;
        let get = |k: &str| peer[k].as_u64().and_then(|d| u32::try_from(d).ok());
        match (get("id"), get("remote-id")) {
            (Some(id), Some(remote)) if remote != 0 => Ok((id, remote)),
            _ => bail!("FRR's BFD peer has no discriminators yet: {peer}"),
        }
    }

    fn frr_peer(&self, shutdown: bool) -> Result<()> {
        let peer = format!("peer {} local-address {}", self.f.node, self.f.router);
        let what = if shutdown { "shutdown" } else { "no shutdown" };
        self.vtysh(&["configure terminal", "bfd", &peer, what])
            .map(|_| ())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if self.frr_started {
            let _ = cmd::run(
                Command::new("ip").args([
                    "netns",
                    "exec",
                    &self.r,
                    "/usr/lib/frr/frrinit.sh",
                    "stop",
                    &self.r,
                ]),
                Duration::from_secs(30),
            );
            let _ = fs::remove_dir_all(Path::new("/etc/frr").join(&self.r));
            let _ = fs::remove_dir_all(Path::new("/var/run/frr").join(&self.r));
        }
        for ns in [&self.r, &self.lb, &self.c] {
            let _ = cmd::run(
                Command::new("ip").args(["netns", "del", ns]),
                cmd::DEFAULT_TIMEOUT,
            );
        }
    }
}

/// The agent's BFD, running on a thread inside the node's namespace.
struct Node {
    link: watch::Receiver<Link>,
    drops: Arc<Drops>,
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Node {
    fn start(ns: &str, f: Family) -> Result<Node> {
        let (link_tx, link) = watch::channel(Link::Waiting);
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = netns::spawn_in(ns, "bfd-node", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let started = (|| {
                    let sockets = Sockets::for_peers(&[f.router])?;
                    let at = sockets.local_addrs();
                    ensure!(
                        at == [SocketAddr::new(f.node, BFD_PORT)],
                        "BFD receives on {at:?}, not on the node's address towards the router"
                    );
                    let peer = BfdPeer {
                        addr: f.router,
                        port: BFD_PORT,
                        link: link_tx,
                    };
                    Bfd::new(BFD, sockets, vec![peer])
                })();
                match started {
                    Ok(bfd) => {
                        let _ = ready_tx.send(Ok(bfd.drops()));
                        bfd.run(stop_rx).await;
                        Ok(())
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::anyhow!("{e:#}")));
                        Err(e)
                    }
                }
            })
        })?;
        let drops = ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the BFD thread did not start")??;
        Ok(Node {
            link,
            drops,
            stop,
            thread: Some(thread),
        })
    }

    fn link(&self) -> Link {
        *self.link.borrow()
    }

    /// Up, and never anything else since the last call (a flap that healed counts too).
    fn stayed_up(&mut self) -> bool {
        let changed = self.link.has_changed().unwrap_or(true);
        *self.link.borrow_and_update() == Link::Up && !changed
    }

    fn wait_link(&self, want: Link, within: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        while self.link() != want {
            ensure!(
                t0.elapsed() < within,
                "BFD link {:?} after {within:?}, wanted {want:?} (drops: {})",
                self.link(),
                self.drops.counts()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(t0.elapsed())
    }

    fn drops(&self) -> DropCounts {
        self.drops.counts()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A BFD control packet in UDP in IPv4 or IPv6 from `src` to `dst` with TTL / hop limit `ttl`,
/// sent `count` times from a raw socket in the forger's namespace (any source address).
fn forge(ns: &str, src: IpAddr, dst: IpAddr, ttl: u8, p: Packet, count: usize) -> Result<()> {
    let datagram = ip_datagram(src, dst, ttl, &udp(src, dst, &p.encode()));
    netns::run_in(ns, move || {
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut to: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (family, len) = match dst {
            IpAddr::V4(d) => {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(d).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
                unsafe { (&raw mut to).cast::<libc::sockaddr_in>().write(sin) };
                (libc::AF_INET, std::mem::size_of::<libc::sockaddr_in>())
            }
            IpAddr::V6(d) => {
                let sin6 = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: 0,
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: d.octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
                unsafe { (&raw mut to).cast::<libc::sockaddr_in6>().write(sin6) };
                (libc::AF_INET6, std::mem::size_of::<libc::sockaddr_in6>())
            }
        };
        // SAFETY: plain socket calls on a descriptor closed below; the buffers live throughout.
        // IPPROTO_RAW: we write the IP header (IPv6 too, on Linux).
        unsafe {
            let fd = libc::socket(family, libc::SOCK_RAW, libc::IPPROTO_RAW);
            ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            for _ in 0..count {
                let n = libc::sendto(
                    fd,
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    0,
                    (&raw const to).cast(),
                    len as libc::socklen_t,
                );
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    libc::close(fd);
                    bail!("raw sendto: {e}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            libc::close(fd);
        }
        Ok(())
    })
}

/// A UDP datagram to BFD's port with its checksum (IPv6 requires one; IPv4 takes it too).
fn udp(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::with_capacity(len.into());
    u.extend_from_slice(&49152u16.to_be_bytes());
    u.extend_from_slice(&BFD_PORT.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, libc::IPPROTO_UDP as u8]);
            pseudo.extend_from_slice(&len.to_be_bytes());
        }
        (s, d) => {
            pseudo.extend_from_slice(&v6_octets(s));
            pseudo.extend_from_slice(&v6_octets(d));
            pseudo.extend_from_slice(&u32::from(len).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, libc::IPPROTO_UDP as u8]);
        }
    }
    pseudo.extend_from_slice(&u);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    u[6..8].copy_from_slice(&sum.to_be_bytes());
    u
}

fn v6_octets(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

/// The Internet checksum (RFC 1071).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// `l4` in an IPv4 header (the kernel fills its checksum) or an IPv6 header.
fn ip_datagram(src: IpAddr, dst: IpAddr, ttl: u8, l4: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (20 + l4.len()) as u16;
            b.extend_from_slice(&[0x45, 0xc0]);
            b.extend_from_slice(&total.to_be_bytes());
            b.extend_from_slice(&[0, 0, 0x40, 0, ttl, libc::IPPROTO_UDP as u8, 0, 0]);
            b.extend_from_slice(&s.octets());
            b.extend_from_slice(&d.octets());
        }
        (s, d) => {
            // Version 6, traffic class 0xc0 (network control, as BFD sends).
            b.extend_from_slice(&[0x6c, 0, 0, 0]);
            b.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            b.extend_from_slice(&[libc::IPPROTO_UDP as u8, ttl]);
            b.extend_from_slice(&v6_octets(s));
            b.extend_from_slice(&v6_octets(d));
        }
    }
    b.extend_from_slice(l4);
    b
}

fn admin_down(frr_disc: u32, node_disc: u32) -> Packet {
    Packet {
        diag: 7,
        state: State::AdminDown,
        poll: false,
        final_: false,
        detect_mult: 3,
        my_disc: frr_disc,
        your_disc: node_disc,
        desired_min_tx: 100_000,
        required_min_rx: 100_000,
    }
}

/// The scenario of the module's header over one address family.
fn bfd_with_frr(f: Family) -> Result<()> {
    require_root();
    ensure!(
        Path::new("/usr/lib/frr/bfdd").exists(),
        "FRR is not installed (scripts/bootstrap.sh installs frr)"
    );
    let mut t = Topology::build(f)?;
    t.start_frr()?;
    let mut node = Node::start(&t.lb, f)?;
    // Up only if FRR takes our packets (it drops those below TTL / hop limit 255).
    let took = node.wait_link(Link::Up, Duration::from_secs(20))?;
    eprintln!("{f:?}: BFD with FRR up in {took:?}");
    let (frr_disc, node_disc) = {
        let t0 = Instant::now();
        loop {
            match t.frr_discriminators() {
                Ok(d) => break d,
                Err(e) if t0.elapsed() > Duration::from_secs(10) => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    };

    // The forger resolves the node's link address first: its forged datagrams then leave at
    // once instead of waiting in the neighbour queue (seen lost once, both tests at once).
    cmd::run_ok(
        Command::new("ip")
            .args(["netns", "exec", &t.c, "ping", "-c", "1", "-W", "5"])
            .arg(f.node.to_string()),
        Duration::from_secs(10),
    )?;
    // A forged AdminDown with the right discriminators from the router's address, TTL 64.
    assert_eq!(node.link(), Link::Up);
    node.stayed_up(); // from here on
    let forged = admin_down(frr_disc, node_disc);
    forge(&t.c, f.router, f.node, 64, forged, 5)?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.stayed_up(), "a forged AdminDown (TTL 64) was taken");
    assert_eq!(node.drops().ttl, 5, "{}", node.drops());

    // TTL 255 but from the forger's own address.
    forge(&t.c, f.forger, f.node, 255, forged, 3)?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        node.stayed_up(),
        "a forged AdminDown from another address was taken"
    );
    assert_eq!(node.drops().unknown_source, 3, "{}", node.drops());
    eprintln!("forged packets dropped: {}", node.drops());

    // The router's own AdminDown: Down, but no failure.
    t.frr_peer(true)?;
    node.wait_link(Link::AdminDown, Duration::from_secs(5))?;
    t.frr_peer(false)?;
    node.wait_link(Link::Up, Duration::from_secs(10))?;

    // A real failure: the link to the router is cut. Detected once the detect time has passed
    // since the router's last packet, counted here from the cut (up to an interval later):
    // within the detect time, plus a margin for this thread's polling on a busy machine.
    let detect = BFD.interval * u32::from(BFD.multiplier);
    ip(&["-n", &t.r, "link", "set", "p0", "down"])?;
    let took = node.wait_link(Link::Failed, Duration::from_secs(3))?;
    eprintln!("{f:?}: link cut: BFD failed after {took:?} (detect time {detect:?})");
    ensure!(
        took <= detect + DETECT_MARGIN,
        "the dead router was detected after {took:?}, detect time {detect:?}"
    );
    Ok(())
}

/// Scheduling slack over the detect time for the dead router's detection.
const DETECT_MARGIN: Duration = Duration::from_millis(200);

#[test]
fn bfd_with_frr_ignores_forged_packets_and_admin_down_is_no_failure() -> Result<()> {
    bfd_with_frr(V4)
}

#[test]
fn bfd_over_ipv6_with_frr_ignores_forged_packets_and_admin_down_is_no_failure() -> Result<()> {
    bfd_with_frr(V6)
}
