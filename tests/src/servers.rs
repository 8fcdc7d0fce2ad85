//! The small servers each backend runs besides nginx, as threads of this process whose sockets live in
//! the backend's network namespace (see [`crate::netns`]):
//!
//! - UDP "who are you" on port [`UDP_PORT`]: answers every datagram with the backend's name. One socket
//!   is bound to the VIP and one to the backend's own address, so that each reply leaves with the
//!   address the request was sent to (an unbound UDP reply would leave from the backend's interface
//!   address, and the client, connected to the VIP, would drop it: the classic DSR + UDP trap).
//! - TCP line echo on port [`ECHO_PORT`]: for every line `L` it answers `<name> L`, so a long-lived
//!   client learns which backend holds its connection and can check every echo.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns;

/// The UDP port the backends answer on (and the lab's UDP VIP port).
pub const UDP_PORT: u16 = 5353;
/// The TCP echo port the backends listen on (and the lab's echo VIP port).
pub const ECHO_PORT: u16 = 7000;
/// No server thread lives longer than this, whatever happens to the lab that started it.
pub const MAX_LIFETIME: Duration = Duration::from_secs(4 * 3600);
/// At most this many echo connections are served at once per backend.
const MAX_ECHO_CONNS: u64 = 512;

/// What one backend's servers have seen so far.
#[derive(Debug, Default)]
pub struct ServerStats {
    pub udp_answered: AtomicU64,
    pub echo_conns: AtomicU64,
    pub echo_lines: AtomicU64,
}

/// The running servers of one backend; [`BackendServers::stop`] (or drop) ends them.
pub struct BackendServers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    pub stats: Arc<ServerStats>,
}

impl BackendServers {
    /// Binds the sockets inside namespace `ns` (errors are returned here), then serves on threads.
    pub fn start(ns: &str, name: &str, own: Ipv4Addr, vip: Ipv4Addr) -> Result<BackendServers> {
        Self::start_with(ns, name, &[own.into(), vip.into()])
    }

    /// As [`Self::start`], answering UDP on each of `addrs` (own addresses and VIPs of either
    /// family); the echo listens on every address of both families.
    pub fn start_with(ns: &str, name: &str, addrs: &[IpAddr]) -> Result<BackendServers> {
        let addrs = addrs.to_vec();
        let (udp, echo) = netns::run_in(ns, move || {
            let mut udp = Vec::new();
            for addr in addrs {
                udp.push(
                    UdpSocket::bind(SocketAddr::new(addr, UDP_PORT)).with_context(|| {
                        format!("bind UDP {addr} port {UDP_PORT} (is it on lo?)")
                    })?,
                );
            }
            // [::] takes IPv4 too (bindv6only is 0 in a new namespace).
            let echo = TcpListener::bind(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), ECHO_PORT))
                .with_context(|| format!("bind TCP [::]:{ECHO_PORT}"))?;
            Ok((udp, echo))
        })
        .with_context(|| format!("starting the UDP and echo servers of backend {name} in {ns}"))?;

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ServerStats::default());
        let mut threads = Vec::new();
        for sock in udp {
            let (stop, stats, name) = (stop.clone(), stats.clone(), name.to_string());
            threads.push(
                thread::Builder::new()
                    .name(format!("udp-{name}"))
                    .spawn(move || serve_udp(sock, &name, &stop, &stats))?,
            );
        }
        {
            let (stop, stats, name) = (stop.clone(), stats.clone(), name.to_string());
            threads.push(
                thread::Builder::new()
                    .name(format!("echo-{name}"))
                    .spawn(move || serve_echo(echo, &name, &stop, &stats))?,
            );
        }
        Ok(BackendServers {
            stop,
            threads,
            stats,
        })
    }

    /// Stops every thread and waits for them (each notices within ~200 ms).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for BackendServers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_udp(sock: UdpSocket, name: &str, stop: &AtomicBool, stats: &ServerStats) {
    let started = Instant::now();
    if sock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .is_err()
    {
        return;
    }
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_LIFETIME {
        match sock.recv_from(&mut buf) {
            Ok((_, from)) => {
                if sock.send_to(name.as_bytes(), from).is_ok() {
                    stats.udp_answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn serve_echo(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>, stats: &Arc<ServerStats>) {
    let started = Instant::now();
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    let active = Arc::new(AtomicU64::new(0));
    let mut conns: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_LIFETIME {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::SeqCst) >= MAX_ECHO_CONNS {
                    continue; // dropped: closes the connection
                }
                stats.echo_conns.fetch_add(1, Ordering::Relaxed);
                active.fetch_add(1, Ordering::SeqCst);
                let (stop, stats, conn_active, name) = (
                    stop.clone(),
                    stats.clone(),
                    active.clone(),
                    name.to_string(),
                );
                let spawned = thread::Builder::new()
                    .name(format!("echo-{name}-conn"))
                    .spawn(move || {
                        let _ = echo_conn(stream, &name, &stop, &stats, started);
                        conn_active.fetch_sub(1, Ordering::SeqCst);
                    });
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(_) => {
                        active.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                conns.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(Duration::from_millis(10)),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn echo_conn(
    stream: TcpStream,
    name: &str,
    stop: &AtomicBool,
    stats: &ServerStats,
    started: Instant,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while !stop.load(Ordering::SeqCst) && started.elapsed() < MAX_LIFETIME {
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                if !line.ends_with('\n') {
                    continue; // partial line (read timed out mid-line): keep reading
                }
                writer.write_all(format!("{name} {line}").as_bytes())?;
                stats.echo_lines.fetch_add(1, Ordering::Relaxed);
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
