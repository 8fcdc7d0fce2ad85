//! A long-lived TCP connection from the client namespace to a backend's line echo (see
//! [`crate::servers`]), sending one line every `interval` and checking every echo. It tells which
//! backend holds the connection (the echo starts with the backend's name) and records every failure:
//! a reset, a timeout, a wrong or missing echo, a change of backend.
//!
//! A UDP stream ([`LongConn::open_udp`]) is the same client over one UDP socket (one source
//! port: one flow) to the backends' "who are you" server: each datagram's answer names the
//! backend that got it, so a datagram that reached another backend is a change of backend.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::netns;

/// How long one echo may take before it counts as lost. Generous on purpose: on a loaded
/// 2-core machine an echo can wait seconds for the scheduler, and a segment that TCP
/// retransmits arrives late but intact; neither is a broken connection. A reset or a wrong
/// echo is still recorded at once, and a connection that stays black-holed still fails here.
pub const ECHO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a UDP stream waits for a datagram's answer before counting it lost (an error):
/// shorter than TCP's, as nothing retransmits it and the stream waits meanwhile.
pub const UDP_ANSWER_TIMEOUT: Duration = Duration::from_secs(3);

/// The state of a [`LongConn`] at one moment.
#[derive(Debug, Clone, Default)]
pub struct LongConnReport {
    pub target: String,
    /// Lines sent.
    pub sent: u64,
    /// Correct echoes received.
    pub echoed: u64,
    /// Every backend name seen in an echo, in order of first appearance.
    pub backends: Vec<String>,
    /// Everything that went wrong, in order. The connection stops at the first I/O error.
    pub errors: Vec<String>,
    /// Whether the client loop is still running.
    pub running: bool,
    pub elapsed: Duration,
}

impl LongConnReport {
    /// No error, every line echoed, one backend throughout.
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty() && self.sent == self.echoed && self.backends.len() == 1
    }
}

/// The running client; [`LongConn::finish`] stops it and returns the final report. Dropping it stops
/// it too. It stops by itself after `max_duration`, or when `stop_flag` is raised (the lab raises
/// every flag it handed out when it is torn down).
pub struct LongConn {
    /// The client's own endpoint (its source address and port: the flow).
    local: SocketAddr,
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<LongConnReport>>,
    handle: Option<JoinHandle<()>>,
}

impl LongConn {
    /// Connects from namespace `ns` to `target` (within 3 s), checks one echo, then keeps sending a
    /// line every `interval` on a background thread until stopped or `max_duration` is over.
    pub fn open(
        ns: &str,
        target: impl Into<SocketAddr>,
        interval: Duration,
        max_duration: Duration,
        stop_flag: Arc<AtomicBool>,
    ) -> Result<LongConn> {
        let target: SocketAddr = target.into();
        let stream = netns::run_in(ns, move || {
            TcpStream::connect_timeout(&target, Duration::from_secs(3))
                .with_context(|| format!("connect to {target}"))
        })
        .with_context(|| format!("opening a long-lived connection from {ns} to {target}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_millis(50)))?;
        let local = stream.local_addr()?;
        let state = Arc::new(Mutex::new(LongConnReport {
            target: format!("{local} -> {target}"),
            running: true,
            ..Default::default()
        }));
        let client = Client {
            stream,
            buf: Vec::new(),
            seq: 0,
        };
        Self::run(client, local, state, interval, max_duration, stop_flag)
    }

    /// As [`LongConn::open`] for a UDP stream: one socket bound in `ns` (its source port: one
    /// flow) sends a datagram every `interval` to `target`, a backend's "who are you" server
    /// ([`crate::servers`]), and waits for each answer (at most [`UDP_ANSWER_TIMEOUT`]). Its
    /// report counts datagrams as lines: `sent`, `echoed` (answered), the backends that
    /// answered, and each unanswered datagram as an error.
    pub fn open_udp(
        ns: &str,
        target: impl Into<SocketAddr>,
        interval: Duration,
        max_duration: Duration,
        stop_flag: Arc<AtomicBool>,
    ) -> Result<LongConn> {
        let target: SocketAddr = target.into();
        let socket = netns::run_in(ns, move || {
            let any: SocketAddr = if target.is_ipv4() {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(any).context("bind a UDP socket")?;
            socket
                .connect(target)
                .with_context(|| format!("connect UDP to {target}"))?;
            Ok(socket)
        })
        .with_context(|| format!("opening a UDP stream from {ns} to {target}"))?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let local = socket.local_addr()?;
        let state = Arc::new(Mutex::new(LongConnReport {
            target: format!("udp {local} -> {target}"),
            running: true,
            ..Default::default()
        }));
        let client = UdpClient { socket, seq: 0 };
        Self::run(client, local, state, interval, max_duration, stop_flag)
    }

    /// Checks the first echo, then runs `client` on its own thread (see [`LongConn::open`]).
    fn run(
        mut client: impl Step + Send + 'static,
        local: SocketAddr,
        state: Arc<Mutex<LongConnReport>>,
        interval: Duration,
        max_duration: Duration,
        stop_flag: Arc<AtomicBool>,
    ) -> Result<LongConn> {
        // The first echo is synchronous so that the caller knows the backend on return.
        client.step(&state);
        {
            let s = state.lock().unwrap();
            if !s.errors.is_empty() {
                bail!(
                    "long-lived connection {}: first echo failed: {}",
                    s.target,
                    s.errors.join("; ")
                );
            }
        }
        let (stop, st) = (stop_flag, state.clone());
        let stop2 = stop.clone();
        let handle = thread::Builder::new()
            .name("long-conn".into())
            .spawn(move || {
                let started = Instant::now();
                while !stop2.load(Ordering::SeqCst) && started.elapsed() < max_duration {
                    sleep_unless(&stop2, interval);
                    if stop2.load(Ordering::SeqCst) {
                        break;
                    }
                    if !client.step(&st) {
                        break;
                    }
                }
                let mut s = st.lock().unwrap();
                s.running = false;
                s.elapsed = started.elapsed();
            })?;
        Ok(LongConn {
            local,
            stop,
            state,
            handle: Some(handle),
        })
    }

    /// The client's endpoint (source address and port).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The backend that answered the first echo.
    pub fn backend(&self) -> String {
        self.state
            .lock()
            .unwrap()
            .backends
            .first()
            .cloned()
            .unwrap_or_default()
    }

    /// The report so far (the connection keeps running).
    pub fn snapshot(&self) -> LongConnReport {
        self.state.lock().unwrap().clone()
    }

    /// Waits until `n` more correct echoes arrived than now, at most `timeout`. Fails early when
    /// the connection has an error or stopped.
    pub fn wait_echoes(&self, n: u64, timeout: Duration) -> Result<LongConnReport> {
        let target = self.snapshot().echoed + n;
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if !s.errors.is_empty() {
                bail!(
                    "long-lived connection {} failed: {}",
                    s.target,
                    s.errors.join("; ")
                );
            }
            if s.echoed >= target {
                return Ok(s);
            }
            if !s.running {
                bail!(
                    "long-lived connection {} stopped after {} echoes",
                    s.target,
                    s.echoed
                );
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "long-lived connection {}: only {} of {} echoes after {timeout:?}",
                    s.target,
                    s.echoed,
                    target
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the client and returns what it saw.
    pub fn finish(mut self) -> LongConnReport {
        self.stop_and_join();
        self.snapshot()
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for LongConn {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

fn sleep_unless(stop: &AtomicBool, d: Duration) {
    let end = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// One request and its answer, recorded in the report.
trait Step {
    /// Returns false when the flow is unusable (the stream stops).
    fn step(&mut self, state: &Mutex<LongConnReport>) -> bool;
}

/// Records `backend` as the answer's: a backend other than the first is an error.
fn record_backend(s: &mut LongConnReport, seq: u64, backend: &str) {
    if !s.backends.iter().any(|b| b == backend) {
        if let Some(first) = s.backends.first() {
            let msg = format!("seq {seq}: backend changed from {first} to {backend}");
            s.errors.push(msg);
        }
        s.backends.push(backend.to_string());
    }
    s.echoed += 1;
}

struct UdpClient {
    socket: UdpSocket,
    seq: u64,
}

impl Step for UdpClient {
    fn step(&mut self, state: &Mutex<LongConnReport>) -> bool {
        self.seq += 1;
        state.lock().unwrap().sent += 1;
        if let Err(e) = self.socket.send(format!("seq {}", self.seq).as_bytes()) {
            let msg = format!("seq {}: send failed: {e}", self.seq);
            state.lock().unwrap().errors.push(msg);
            return false;
        }
        let deadline = Instant::now() + UDP_ANSWER_TIMEOUT;
        let mut buf = [0u8; 256];
        while Instant::now() < deadline {
            match self.socket.recv(&mut buf) {
                Ok(n) => {
                    let backend = String::from_utf8_lossy(&buf[..n]).trim().to_owned();
                    record_backend(&mut state.lock().unwrap(), self.seq, &backend);
                    return true;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                // An ICMP port unreachable (no server) and the like: recorded, the stream goes on.
                Err(e) => {
                    let msg = format!("seq {}: receive failed: {e}", self.seq);
                    state.lock().unwrap().errors.push(msg);
                    return true;
                }
            }
        }
        let msg = format!("seq {}: no answer within {UDP_ANSWER_TIMEOUT:?}", self.seq);
        state.lock().unwrap().errors.push(msg);
        true
    }
}

struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    seq: u64,
}

impl Step for Client {
    /// Sends one line and waits for its echo. Returns false when the connection is unusable.
    fn step(&mut self, state: &Mutex<LongConnReport>) -> bool {
        self.seq += 1;
        let line = format!("seq {}\n", self.seq);
        state.lock().unwrap().sent += 1;
        if let Err(e) = self.stream.write_all(line.as_bytes()) {
            state
                .lock()
                .unwrap()
                .errors
                .push(format!("seq {}: send failed: {e}", self.seq));
            return false;
        }
        let deadline = Instant::now() + ECHO_TIMEOUT;
        let reply = loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = self.buf.drain(..=pos).collect();
                break String::from_utf8_lossy(&l).into_owned();
            }
            if Instant::now() >= deadline {
                state
                    .lock()
                    .unwrap()
                    .errors
                    .push(format!("seq {}: no echo within {ECHO_TIMEOUT:?}", self.seq));
                // The echo may still come; later lines would then mismatch, and that is recorded.
                return true;
            }
            let mut chunk = [0u8; 512];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    state
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("seq {}: connection closed by peer", self.seq));
                    return false;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    state
                        .lock()
                        .unwrap()
                        .errors
                        .push(format!("seq {}: receive failed: {e}", self.seq));
                    return false;
                }
            }
        };
        let mut s = state.lock().unwrap();
        let expected_tail = format!(" seq {}\n", self.seq);
        match reply.strip_suffix(&expected_tail) {
            Some(backend) if !backend.is_empty() && !backend.contains(' ') => {
                record_backend(&mut s, self.seq, backend);
            }
            _ => {
                let msg = format!("seq {}: unexpected echo {:?}", self.seq, reply);
                s.errors.push(msg);
            }
        }
        true
    }
}
