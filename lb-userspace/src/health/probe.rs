//! Active health checks: a TCP connect or a minimal HTTP/1.0 GET per (backend, check), each a
//! tokio task. Concurrency is shared out by who asks: every [`Group`] (a Service, or a VIP of the
//! static config) has its own [`SHARE`] of probes in flight, so a Service whose check ports are
//! silent (each probe waiting out its timeout) slows only its own checks, never another
//! Service's; a target that several groups ask for may take a permit from any of them. In flight
//! at once: at most [`SHARE`] per group (hundreds of nodes cost a bounded number of sockets per
//! Service). A [`Tracker`] turns results into verdicts with rise/fall counts, quicker
//! re-probes while a verdict is about to change (HAProxy's `fastinter`) and a hold-down that
//! grows with flapping; each change is logged once with its reason and wakes the caller.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::info;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::metrics::HealthMetrics;
use super::{Health, Verdict};
use crate::http::status_code;
use crate::model::{CheckProtocol, HealthCheck};

/// Probes in flight at once per [`Group`]: one Service's silent ports hold at most this many of
/// its own permits and none of anybody else's.
pub const SHARE: usize = 32;
/// The first hold-down after a backend went down: it comes back no sooner than this after it
/// went down, however soon its checks pass.
pub const HOLD_DOWN: Duration = Duration::from_secs(5);
/// Each further fall within [`FLAP_WINDOW`] doubles the hold-down, up to [`HOLD_DOWN_MAX`].
pub const FLAP_WINDOW: Duration = Duration::from_secs(300);
pub const HOLD_DOWN_MAX: Duration = Duration::from_secs(60);
/// Most bytes of an HTTP answer read (the status line is all that counts).
const HTTP_READ_LIMIT: usize = 1024;

/// Why a probe failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeError {
    /// Connection refused: nothing listens (matters for implicit checks).
    pub refused: bool,
    pub reason: String,
}

/// One probe of `addr` by `check`.
pub async fn probe_once(addr: IpAddr, check: &HealthCheck) -> Result<(), ProbeError> {
    let target = SocketAddr::new(addr, check.port);
    let fail = |reason: String| ProbeError {
        refused: false,
        reason,
    };
    let work = async {
        let mut stream = TcpStream::connect(target).await.map_err(|e| ProbeError {
            refused: e.kind() == std::io::ErrorKind::ConnectionRefused,
            reason: format!("connect to {target}: {e}"),
        })?;
        if check.protocol == CheckProtocol::Tcp {
            return Ok(());
        }
        let status = http_get(&mut stream, addr, &check.path)
            .await
            .map_err(|e| fail(format!("GET {target}{}: {e}", check.path)))?;
        if (200..400).contains(&status) {
            Ok(())
        } else {
            Err(fail(format!("GET {target}{}: status {status}", check.path)))
        }
    };
    match tokio::time::timeout(check.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(fail(format!(
            "{} {target}: no answer within {:?}",
            if check.protocol == CheckProtocol::Tcp {
                "connect to"
            } else {
                "GET"
            },
            check.timeout
        ))),
    }
}

/// Sends `GET path` on `stream` and returns the status code of the answer.
async fn http_get(stream: &mut TcpStream, host: IpAddr, path: &str) -> std::io::Result<u16> {
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: sluice-health\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.contains(&b'\n') && buf.len() < HTTP_READ_LIMIT {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    status_code(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&buf[..buf.len().min(40)])
            ),
        )
    })
}

/// Rise/fall/hold-down bookkeeping of one target. Pure (time is passed in).
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    implicit: bool,
    health: Health,
    successes: u32,
    failures: u32,
    ever_up: bool,
    /// When the target went down, the last few times (flap damping).
    falls: VecDeque<Instant>,
    reason: String,
}

impl Tracker {
    pub fn new(check: &HealthCheck) -> Self {
        Self {
            rise: check.rise,
            fall: check.fall,
            implicit: check.implicit,
            health: Health::Unknown,
            successes: 0,
            failures: 0,
            ever_up: false,
            falls: VecDeque::new(),
            reason: "not probed yet".into(),
        }
    }

    pub fn verdict(&self) -> Verdict {
        Verdict {
            health: self.health,
            reason: self.reason.clone(),
        }
    }

    /// How long after the last fall the target must stay down: doubled by each fall within
    /// [`FLAP_WINDOW`] before it.
    pub fn hold_down(&self, now: Instant) -> Duration {
        let recent = self
            .falls
            .iter()
            .filter(|t| now.duration_since(**t) < FLAP_WINDOW)
            .count() as u32;
        let factor = 1u32 << recent.saturating_sub(1).min(4);
        (HOLD_DOWN * factor).min(HOLD_DOWN_MAX)
    }

    /// Takes one probe result; returns the new verdict when it changed.
    pub fn observe(&mut self, result: Result<(), ProbeError>, now: Instant) -> Option<Verdict> {
        let before = self.health;
        match result {
            Ok(()) => {
                self.failures = 0;
                self.successes = self.successes.saturating_add(1);
                self.ever_up = true;
                match self.health {
                    Health::Up => {}
                    Health::Unknown | Health::Unchecked => {
                        self.health = Health::Up;
                        self.reason = "check passed".into();
                    }
                    Health::Down => {
                        let held = self
                            .falls
                            .back()
                            .is_some_and(|t| now.duration_since(*t) < self.hold_down(now));
                        if self.successes >= self.rise && !held {
                            self.health = Health::Up;
                            self.reason = format!("{} checks passed in a row", self.successes);
                        } else if self.successes >= self.rise {
                            self.reason = format!(
                                "passing again, held down for {:?} after falling (flap damping)",
                                self.hold_down(now)
                            );
                        }
                    }
                }
            }
            Err(e) => {
                self.successes = 0;
                self.failures = self.failures.saturating_add(1);
                if self.implicit && !self.ever_up && e.refused {
                    // Nothing ever listened: a cluster without kube-proxy, not a dead node.
                    self.health = Health::Unchecked;
                    self.failures = 0;
                    self.reason = format!("{} (never answered: not held against it)", e.reason);
                } else if self.health != Health::Down && self.failures >= self.fall {
                    self.health = Health::Down;
                    self.reason = format!("{} failed checks in a row: {}", self.failures, e.reason);
                    self.falls.push_back(now);
                    while self.falls.len() > 8 {
                        self.falls.pop_front();
                    }
                } else if self.health == Health::Down {
                    self.reason = format!("still failing: {}", e.reason);
                }
            }
        }
        (self.health != before).then(|| self.verdict())
    }

    /// How long until the next probe: the interval, or a fifth of it while the verdict is about
    /// to change (failing but not yet down, passing but not yet up).
    pub fn next_delay(&self, interval: Duration) -> Duration {
        let turning = (self.failures > 0 && self.health != Health::Down)
            || (self.successes > 0 && self.health == Health::Down);
        if turning { interval / 5 } else { interval }
    }
}

/// What is probed: a backend address and a check.
pub type Target = (IpAddr, HealthCheck);
/// Who asks for a probe: a Service (`namespace/name`) or a static VIP. Each has its own share of
/// the probe concurrency.
pub type Group = Arc<str>;

/// The semaphores a probe may take its permit from (those of the groups that ask for it).
type Shares = Arc<Mutex<Vec<Arc<Semaphore>>>>;

struct Probe {
    tracker: Arc<Mutex<Tracker>>,
    shares: Shares,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct Probes {
    probes: BTreeMap<Target, Probe>,
    /// One semaphore of [`SHARE`] permits per group.
    shares: BTreeMap<Group, Arc<Semaphore>>,
}

/// The probes of a set of targets. Targets come and go with the model; a target kept keeps
/// its verdict.
pub struct Prober {
    probes: Mutex<Probes>,
    changed: Arc<Notify>,
    runtime: tokio::runtime::Handle,
    metrics: Option<HealthMetrics>,
}

impl Drop for Prober {
    fn drop(&mut self) {
        if let Ok(probes) = self.probes.lock() {
            for p in probes.probes.values() {
                p.task.abort();
            }
        }
    }
}

impl Prober {
    /// Probes run on `runtime`; every verdict change wakes `changed`.
    pub fn new(
        runtime: tokio::runtime::Handle,
        changed: Arc<Notify>,
        metrics: Option<HealthMetrics>,
    ) -> Self {
        Self {
            probes: Mutex::new(Probes::default()),
            changed,
            runtime,
            metrics,
        }
    }

    /// Probes exactly `targets` from now on, each on the shares of the groups that ask for it.
    pub fn set_targets(&self, targets: &BTreeMap<Target, BTreeSet<Group>>) {
        let Ok(mut state) = self.probes.lock() else {
            return;
        };
        let Probes { probes, shares } = &mut *state;
        probes.retain(|t, p| {
            let keep = targets.contains_key(t);
            if !keep {
                p.task.abort();
            }
            keep
        });
        // A group keeps its semaphore while it asks for anything (its probes in flight hold
        // permits of it); a group that went is forgotten.
        let asking: BTreeSet<&Group> = targets.values().flatten().collect();
        shares.retain(|g, _| asking.contains(g));
        for (i, (target, groups)) in targets.iter().enumerate() {
            let own: Vec<Arc<Semaphore>> = groups
                .iter()
                .map(|g| {
                    shares
                        .entry(g.clone())
                        .or_insert_with(|| Arc::new(Semaphore::new(SHARE)))
                        .clone()
                })
                .collect();
            if let Some(p) = probes.get(target) {
                if let Ok(mut s) = p.shares.lock() {
                    *s = own;
                }
                continue;
            }
            let tracker = Arc::new(Mutex::new(Tracker::new(&target.1)));
            let own = Arc::new(Mutex::new(own));
            // Spread the first probes over the interval, so hundreds do not start at once.
            let offset = target.1.interval.mul_f64((i % 16) as f64 / 16.0);
            let task = self.runtime.spawn(run_probe(
                target.clone(),
                tracker.clone(),
                own.clone(),
                self.changed.clone(),
                self.metrics.clone(),
                offset,
            ));
            probes.insert(
                target.clone(),
                Probe {
                    tracker,
                    shares: own,
                    task,
                },
            );
        }
    }

    /// The targets probed now.
    pub fn targets(&self) -> Vec<Target> {
        self.probes
            .lock()
            .map(|p| p.probes.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The targets whose verdict is down now.
    pub fn down_targets(&self) -> Vec<Target> {
        let Ok(p) = self.probes.lock() else {
            return Vec::new();
        };
        p.probes
            .iter()
            .filter(|(_, p)| {
                p.tracker
                    .lock()
                    .is_ok_and(|t| t.verdict().health == Health::Down)
            })
            .map(|(t, _)| t.clone())
            .collect()
    }

    /// The verdict of a target (unknown if it is not probed).
    pub fn verdict(&self, addr: IpAddr, check: &HealthCheck) -> Verdict {
        self.probes
            .lock()
            .ok()
            .and_then(|p| {
                p.probes
                    .get(&(addr, check.clone()))
                    .and_then(|p| p.tracker.lock().ok().map(|t| t.verdict()))
            })
            .unwrap_or(Verdict {
                health: Health::Unknown,
                reason: "not probed yet".into(),
            })
    }
}

/// A permit from whichever of `shares` gives one first (the other waits are withdrawn);
/// `None` when there is no share (a target nobody asks for) or the semaphores are closed.
async fn permit(shares: &Shares) -> Option<OwnedSemaphorePermit> {
    let shares: Vec<Arc<Semaphore>> = shares.lock().ok()?.clone();
    if shares.is_empty() {
        return None;
    }
    let waits = shares.into_iter().map(|s| Box::pin(s.acquire_owned()));
    futures::future::select_all(waits).await.0.ok()
}

async fn run_probe(
    (addr, check): Target,
    tracker: Arc<Mutex<Tracker>>,
    shares: Shares,
    changed: Arc<Notify>,
    metrics: Option<HealthMetrics>,
    offset: Duration,
) {
    tokio::time::sleep(offset).await;
    loop {
        let started = tokio::time::Instant::now();
        let result = match permit(&shares).await {
            Some(_permit) => probe_once(addr, &check).await,
            None => return,
        };
        if let Some(m) = &metrics {
            m.probe(result.is_ok());
        }
        let (change, delay) = match tracker.lock() {
            Ok(mut t) => {
                let change = t.observe(result, Instant::now());
                (change, t.next_delay(check.interval))
            }
            Err(_) => return,
        };
        if let Some(v) = change {
            info!(
                "health: backend {addr} check {check}: {} ({})",
                v.health.name(),
                v.reason
            );
            if let Some(m) = &metrics {
                m.change(v.health.name());
            }
            changed.notify_one();
        }
        tokio::time::sleep_until(started + delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(refused: bool) -> Result<(), ProbeError> {
        Err(ProbeError {
            refused,
            reason: "x".into(),
        })
    }

    #[test]
    fn fall_rise_and_fast_reprobes() {
        let check = HealthCheck::new(CheckProtocol::Tcp, 80, "/");
        let mut t = Tracker::new(&check);
        let t0 = Instant::now();
        let i = check.interval;
        assert_eq!(t.observe(Ok(()), t0).unwrap().health, Health::Up);
        assert!(t.observe(err(false), t0).is_none());
        assert_eq!(t.next_delay(i), i / 5);
        assert!(t.observe(err(false), t0).is_none());
        let v = t.observe(err(false), t0).unwrap();
        assert_eq!(v.health, Health::Down);
        assert!(v.reason.starts_with("3 failed checks"), "{v:?}");
        assert_eq!(t.next_delay(i), i);
        // Passing again at once: held down for HOLD_DOWN.
        assert!(t.observe(Ok(()), t0).is_none());
        assert!(t.observe(Ok(()), t0).is_none());
        let later = t0 + HOLD_DOWN;
        assert_eq!(t.observe(Ok(()), later).unwrap().health, Health::Up);
    }

    /// Issue 30 item 6: a Down backend that answers again needs `rise` passes in a row after
    /// its hold-down, not one; a failure in between starts the count again.
    #[test]
    fn a_down_backend_returns_only_after_rise_passes_in_a_row() {
        let mut check = HealthCheck::new(CheckProtocol::Tcp, 80, "/");
        check.fall = 1;
        check.rise = 3;
        let mut t = Tracker::new(&check);
        let t0 = Instant::now();
        assert_eq!(t.observe(err(false), t0).unwrap().health, Health::Down);
        // Long past the hold-down: only the rise count holds it.
        let later = t0 + HOLD_DOWN * 2;
        assert!(t.observe(Ok(()), later).is_none(), "one pass brought it up");
        assert!(t.observe(Ok(()), later).is_none(), "two passes of three");
        assert!(t.observe(err(false), later).is_none());
        assert!(t.observe(Ok(()), later).is_none(), "the count starts again");
        assert!(t.observe(Ok(()), later).is_none());
        assert_eq!(t.verdict().health, Health::Down);
        let up = t.observe(Ok(()), later).unwrap();
        assert_eq!(up.health, Health::Up);
        assert_eq!(up.reason, "3 checks passed in a row");
    }

    #[test]
    fn flapping_doubles_the_hold_down() {
        let mut check = HealthCheck::new(CheckProtocol::Tcp, 80, "/");
        check.fall = 1;
        check.rise = 1;
        let mut t = Tracker::new(&check);
        let mut now = Instant::now();
        let mut holds = Vec::new();
        for _ in 0..4 {
            t.observe(err(false), now);
            holds.push(t.hold_down(now));
            now += t.hold_down(now);
            assert_eq!(t.observe(Ok(()), now).unwrap().health, Health::Up);
        }
        assert_eq!(
            holds,
            [HOLD_DOWN, HOLD_DOWN * 2, HOLD_DOWN * 4, HOLD_DOWN * 8]
        );
    }

    #[test]
    fn implicit_check_without_listener_is_unchecked_until_it_ever_answered() {
        let mut check = HealthCheck::new(CheckProtocol::Http, 10256, "/healthz");
        check.implicit = true;
        let mut t = Tracker::new(&check);
        let now = Instant::now();
        for _ in 0..5 {
            t.observe(err(true), now);
        }
        assert_eq!(t.verdict().health, Health::Unchecked);
        // A timeout is a failure even so.
        for _ in 0..3 {
            t.observe(err(false), now);
        }
        assert_eq!(t.verdict().health, Health::Down);
        let mut t = Tracker::new(&check);
        t.observe(Ok(()), now);
        for _ in 0..3 {
            t.observe(err(true), now);
        }
        assert_eq!(t.verdict().health, Health::Down, "it answered once");
    }

    #[tokio::test]
    async fn probes_a_real_listener_and_a_closed_port() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 512];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /ok ");
                let answer: &[u8] = if ok {
                    b"HTTP/1.1 200 OK\r\n\r\nok"
                } else {
                    b"HTTP/1.1 503 no\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
            }
        });
        let lo = IpAddr::from([127, 0, 0, 1]);
        let ok = HealthCheck::new(CheckProtocol::Http, port, "/ok");
        assert_eq!(probe_once(lo, &ok).await, Ok(()));
        let bad = HealthCheck::new(CheckProtocol::Http, port, "/bad");
        let e = probe_once(lo, &bad).await.unwrap_err();
        assert!(e.reason.contains("status 503"), "{e:?}");
        let tcp = HealthCheck::new(CheckProtocol::Tcp, port, "/");
        assert_eq!(probe_once(lo, &tcp).await, Ok(()));
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let closed_port = closed.local_addr().unwrap().port();
        drop(closed);
        let e = probe_once(lo, &HealthCheck::new(CheckProtocol::Tcp, closed_port, "/"))
            .await
            .unwrap_err();
        assert!(e.refused, "{e:?}");
    }

    /// A listener that never accepts, its accept queue filled: the kernel drops every further
    /// SYN (ListenOverflows), so a probe sees silence until its timeout, as from a blackholed
    /// port.
    async fn silent_port() -> (tokio::net::TcpListener, TcpStream, u16) {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let port = listener.local_addr().unwrap().port();
        // Backlog 0 admits one connection to the queue: this one fills it.
        let filler = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        (listener, filler, port)
    }

    /// Service "a/silent" asks for `silent` probes whose ports never answer (timeout = interval
    /// = 5 s, the most its annotation may ask); Service "b/web" has one backend with the default
    /// check. b's backend dies (connection refused): it must be down within 3 s, as if a/silent
    /// did not exist.
    async fn silent_service_does_not_stall_another(silent: usize) {
        let mut held = Vec::new();
        let mut targets: BTreeMap<Target, BTreeSet<Group>> = BTreeMap::new();
        let lo = IpAddr::from([127, 0, 0, 1]);
        for _ in 0..silent {
            let (listener, filler, port) = silent_port().await;
            let mut check = HealthCheck::new(CheckProtocol::Tcp, port, "/");
            check.interval = Duration::from_secs(5);
            check.timeout = Duration::from_secs(5);
            check.validate().unwrap();
            targets.insert((lo, check), BTreeSet::from(["a/silent".into()]));
            held.push((listener, filler));
        }
        // The silent ports are silent.
        let probe = HealthCheck {
            timeout: Duration::from_millis(200),
            ..targets.keys().next().unwrap().1.clone()
        };
        let e = probe_once(lo, &probe).await.unwrap_err();
        assert!(!e.refused && e.reason.contains("no answer"), "{e:?}");

        let backend = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let check = HealthCheck::new(
            CheckProtocol::Tcp,
            backend.local_addr().unwrap().port(),
            "/",
        );
        targets.insert((lo, check.clone()), BTreeSet::from(["b/web".into()]));
        let accepting = tokio::spawn(async move {
            while let Ok((s, _)) = backend.accept().await {
                drop(s);
            }
        });
        let prober = Prober::new(
            tokio::runtime::Handle::current(),
            Arc::new(Notify::new()),
            None,
        );
        prober.set_targets(&targets);
        let wait = |want: Health, within: Duration| {
            let prober = &prober;
            let check = &check;
            async move {
                let start = tokio::time::Instant::now();
                while prober.verdict(lo, check).health != want {
                    if start.elapsed() > within {
                        return Err(prober.verdict(lo, check));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok(start.elapsed())
            }
        };
        let up = wait(Health::Up, Duration::from_secs(10)).await;
        assert!(
            up.is_ok(),
            "b/web never came up beside {silent} silent probes: {up:?}"
        );
        // Let every silent probe be in flight, then b's backend dies.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        accepting.abort();
        let _ = accepting.await;
        let down = wait(Health::Down, Duration::from_secs(3)).await;
        println!("{silent} silent probes of a/silent: b/web's dead backend down after {down:?}");
        assert!(
            down.is_ok(),
            "b/web's dead backend not down within 3 s beside {silent} silent probes of a/silent: {down:?}"
        );
        drop(prober);
        drop(held);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fifty_silent_ports_of_one_service_stall_no_other() {
        silent_service_does_not_stall_another(50).await;
    }

    /// More silent probes than the 64 permits that once were shared by every probe.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn more_silent_ports_than_the_old_shared_limit_stall_no_other() {
        silent_service_does_not_stall_another(130).await;
    }
}
