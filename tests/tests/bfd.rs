//! The agent's BFD against a real router's (FRR bfdd) across network namespaces, with a forger
//! on the same link. Needs root and FRR (scripts/bootstrap.sh).
//!
//! ```text
//!   r  (FRR bfdd, 192.0.2.1 on bridge br0) --+-- lb: the agent's BFD (192.0.2.10)
//!                                           +-- c:  the forger (192.0.2.66, raw socket)
//! ```
//!
//! The forger knows both discriminators (read from FRR) and sends AdminDown from the router's
//! own address, but with TTL 64 (as a host further away would have to): dropped and counted,
//! the session stays Up. From its own address with TTL 255: dropped too. The router's real
//! AdminDown takes BFD Down without a failure (BGP would stay); cutting the link is a failure.

use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
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

const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const FORGER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);

/// The namespaces ("sl<pid>-<n>-<role>", the lab naming, so that a killed run's are removed by
/// the next lab) and FRR's pathspace, removed on drop.
struct Topology {
    r: String,
    lb: String,
    c: String,
    frr_started: bool,
}

fn ip(args: &[&str]) -> Result<()> {
    cmd::run_ok(Command::new("ip").args(args), cmd::DEFAULT_TIMEOUT).map(|_| ())
}

impl Topology {
    fn build() -> Result<Topology> {
        let id = format!("sl{}-0", std::process::id());
        let t = Topology {
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
        ip(&["-n", &t.r, "addr", "add", "192.0.2.1/24", "dev", "br0"])?;
        ip(&["-n", &t.r, "link", "set", "br0", "up"])?;
        for (port, ns, addr) in [("p0", &t.lb, NODE), ("p1", &t.c, FORGER)] {
            ip(&[
                "-n", &t.r, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns",
                ns,
            ])?;
            ip(&["-n", &t.r, "link", "set", port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        }
        Ok(t)
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
 peer {NODE} local-address {ROUTER}
  receive-interval 100
  transmit-interval 100
  detect-multiplier 3
 !
!
",
                ns = self.r,
                run = run.display()
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
            .and_then(|a| a.iter().find(|p| p["peer"] == NODE.to_string()))
            .context("FRR shows no BFD peer for the node")?;
        let get = |k: &str| peer[k].as_u64().and_then(|d| u32::try_from(d).ok());
        match (get("id"), get("remote-id")) {
            (Some(id), Some(remote)) if remote != 0 => Ok((id, remote)),
            _ => bail!("FRR's BFD peer has no discriminators yet: {peer}"),
        }
    }

    fn frr_peer(&self, shutdown: bool) -> Result<()> {
        let peer = format!("peer {NODE} local-address {ROUTER}");
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
    fn start(ns: &str) -> Result<Node> {
        let (link_tx, link) = watch::channel(Link::Waiting);
        let (stop, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = netns::spawn_in(ns, "bfd-node", move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let started = (|| {
                    let sockets = Sockets::for_peers(&[IpAddr::V4(ROUTER)])?;
                    let at = sockets.local_addrs();
                    ensure!(
                        at == [SocketAddr::new(NODE.into(), BFD_PORT)],
                        "BFD receives on {at:?}, not on the node's address towards the router"
                    );
                    let cfg = BfdConfig {
                        interval: Duration::from_millis(100),
                        multiplier: 3,
                    };
                    let peer = BfdPeer {
                        addr: ROUTER.into(),
                        port: BFD_PORT,
                        link: link_tx,
                    };
                    Bfd::new(cfg, sockets, vec![peer])
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

/// An IPv4/UDP datagram with a BFD control packet, any source, any TTL, from a raw socket in
/// the forger's namespace.
fn forge(ns: &str, src: Ipv4Addr, ttl: u8, p: Packet, count: usize) -> Result<()> {
    netns::run_in(ns, move || {
        let bfd = p.encode();
        let total = 20 + 8 + bfd.len();
        let mut b = Vec::with_capacity(total);
        b.extend_from_slice(&[0x45, 0xc0]);
        b.extend_from_slice(&(total as u16).to_be_bytes());
        b.extend_from_slice(&[0, 0, 0x40, 0, ttl, libc::IPPROTO_UDP as u8, 0, 0]);
        b.extend_from_slice(&src.octets());
        b.extend_from_slice(&NODE.octets());
        b.extend_from_slice(&49152u16.to_be_bytes());
        b.extend_from_slice(&BFD_PORT.to_be_bytes());
        b.extend_from_slice(&((8 + bfd.len()) as u16).to_be_bytes());
        b.extend_from_slice(&[0, 0]); // no UDP checksum (IPv4 allows it)
        b.extend_from_slice(&bfd);
        // SAFETY: plain socket calls on a descriptor closed below; the buffers live throughout.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(NODE).to_be(),
                },
                sin_zero: [0; 8],
            };
            for _ in 0..count {
                let n = libc::sendto(
                    fd,
                    b.as_ptr().cast(),
                    b.len(),
                    0,
                    (&raw const to).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
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

#[test]
fn bfd_with_frr_ignores_forged_packets_and_admin_down_is_no_failure() -> Result<()> {
    require_root();
    ensure!(
        Path::new("/usr/lib/frr/bfdd").exists(),
        "FRR is not installed (scripts/bootstrap.sh installs frr)"
    );
    let mut t = Topology::build()?;
    t.start_frr()?;
    let mut node = Node::start(&t.lb)?;
    let took = node.wait_link(Link::Up, Duration::from_secs(20))?;
    eprintln!("BFD with FRR up in {took:?}");
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

    // A forged AdminDown with the right discriminators from the router's address, TTL 64.
    assert_eq!(node.link(), Link::Up);
    node.stayed_up(); // from here on
    forge(&t.c, ROUTER, 64, admin_down(frr_disc, node_disc), 5)?;
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.stayed_up(), "a forged AdminDown (TTL 64) was taken");
    assert_eq!(node.drops().ttl, 5, "{}", node.drops());

    // TTL 255 but from the forger's own address.
    forge(&t.c, FORGER, 255, admin_down(frr_disc, node_disc), 3)?;
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

    // A real failure: the link to the router is cut.
    ip(&["-n", &t.r, "link", "set", "p0", "down"])?;
    let took = node.wait_link(Link::Failed, Duration::from_secs(3))?;
    eprintln!("link cut: BFD failed after {took:?}");
    Ok(())
}
